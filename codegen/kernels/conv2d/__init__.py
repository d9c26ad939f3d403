"""Direct-convolution kernels: conv2d, conv2d_input_grad, conv2d_weight_grad (NCHW / OIHW).

Modules: layout.py (the padded copy, the weights copy: shared by all), core.py (the plan of
conv2d / conv2d_input_grad and its kernel function), direct.py and channel.py (its two
algorithms; the flat mode is the direct one over one long row), phased.py (the strided input
gradient, phase by phase on the core), transposed.py (the stride-1 input gradient as a
transposed convolution, where the core's padding would waste many multiply-adds), wgrad.py (conv2d_weight_grad), window.py (groups > 1 or
dilation > 1: all three primitives), pointwise.py (1x1 kernels without padding: all three
primitives as matrix products on matmul.py's tile functions).

All three read the image operand through a zero-padded copy that each thread prepares in its scratch
region (`layout.Prep`). The copy makes every tap of every output pixel an in-bounds, unmasked read, so the
inner loops have no border cases; it costs O(input) per image against O(input * O * KH * KW) FMAs.
The copy also removes the strides from the inner loops:

- a horizontal stride sx is undone by splitting each padded row into sx phase rows (column
  Q = q' * sx + phase is stored at [phase][q']), so the input pixels of sixteen consecutive output
  pixels are sixteen consecutive floats for every tap;
- the input gradient is a stride-1 convolution of the cotangent, padded by KH-1-ph / KW-1-pw, with
  the weights flipped and transposed: the copy pads, and a flipped, transposed copy of the weights
  (also in scratch) lets it share the forward core. With strides, each output phase (pixels
  py + sh*y', px + sw*x') is its own stride-1 convolution with the sub-kernel of the taps that
  reach it (phased.py), so no multiply-add sees the zeros a dilated cotangent would have.

The stride-1 input gradient takes the transposed form instead of the core when the cost model
says so (small planes with large kernels, LeNet-5's second convolution: 4/9 of the core's
multiply-adds there see a cotangent): vectors along the cotangent rows, PR output rows x KW taps
of accumulators, the taps' column offsets applied by shuffles after the sums over (o, i).

Grouped and dilated convolutions (depthwise above all) run on window loops instead (window.py).

conv2d and conv2d_input_grad share one register-blocked core (`core.Core`, direct.py): an item is
one image and a block of R output channels (and a chunk of rows when there are few items); a tile is R channels x
PR output rows x PV vectors of output columns in R*PR*PV vector accumulators (vectors run along the
output row, which is contiguous in NCHW). The input-channel loop and the kernel-row loop (which
skips rows that only see padding) stay loops; the KW taps of a kernel row are unrolled. Each tap
costs PR*PV vector loads, R broadcast weights and R*PR*PV FMAs. The weights are copied to
scratch in blocks of R output channels (`layout.block_weights`: the R weights of a tap side by
side), so that one pointer addresses a tap's R broadcasts: with R pointers live through the tap
loops, a loop function shared by kernels of different shapes ran out of general registers. With an epilogue, it runs on each
item's R output planes right after they are computed.

conv2d_weight_grad is a reduction over the images and output pixels (wgrad.py): vector
accumulators per (input channel, R output channels, kernel row), summed horizontally at the end.
Without padding and strides (LeNet-5) it reads the input in place, no copy; its channel blocks
shrink to C / chunks channels when the call is split in many chunks, so that the copies are not
made once per chunk.

Short rows (LeNet-5's 8, 12 and 24 columns would fill half or three quarters of the vectors) go
in a flat mode when the strides are 1 and it saves vectors: out'[x'] with x' = y*rp + x is one long
row over the padded copy's row pitch rp (the columns x >= ox between the rows are computed and
dropped), so vectors run across output rows. The core writes out' of an item's R channels to a
per-thread buffer and copies the valid columns to out (then the epilogue); the kernel-row loop skips
per block of vectors the kernel rows that see only padding rows for all of the block's output rows.
The weight gradient copies each chunk's cotangents into rows of pitch rp (zeros between them) and
sums over x' in the same way; a per-vector lane-mask table keeps the x reads of the columns between
rows out of the sums (0 * Inf). The input gradient without column padding (pw = 0) stores its
padded copy with row pitch W instead of W + KW - 1: the KW - 1 columns of right padding of a row
are the KW - 1 columns of left padding of the next one (all zeros), so out' is out with no columns
between the rows (whole vectors), and a zero row after the last absorbs the wrap of the last row.

Rows at most half a vector long with O a multiple of the vector length (LeNet-5's second conv,
strided or not, and the input gradients of such rows: ResNet-8's 64 channels of 8 x 8, 133
GF/s on one thread against 109 in the flat mode) use a channel mode instead (channel.py):
vectors over vl output channels, PR whole output rows of pixels in PR*OX accumulators, each tap
one vector of weights (transposed to [c][i][j][o] in scratch) and one broadcast input pixel per
accumulator; a 16x16 shuffle transpose turns the accumulators into rows of the output planes. No
lane is wasted.

Border tiles clamp their channel and row indices to the last valid one (they recompute and store the
same values into the same elements) instead of having code variants; the weight gradient writes only
the valid ones. Output columns are masked.

Compile time: as in matmul.py, the loops are shape-generic functions shared by all kernels of an
LLVM module with equal compile-time keys (`toolkit.shared_function`: dtype, register block, kernel
width, stride phases); the kernel of an instruction passes its shapes, strides and padding as constants.
Inf or NaN weights: the input gradient multiplies them by the zeros of the padding and dilation
(0 * Inf = NaN) where the reference skips those (output, tap) pairs.
"""

from . import core, wgrad  # noqa: F401  (registers the kernels)
from .layout import FORCE  # noqa: F401  (blocking overrides, benchmarks/kernels_dense.py)
from .wgrad import WGRAD_CHUNK_BYTES  # noqa: F401
