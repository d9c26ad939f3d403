"""Writes tests/golden/optim_torch.npz and optim_torch.json: torch.optim trajectories that
tests/test_optim.py compares tracejit.optim against, so the tests need no torch.

Run once with torch installed (python tests/golden/make_optim_golden.py); commit both files. Each
case applies a fixed sequence of gradients (stored too, so the comparison is of the update rule
alone) to a small parameter dict with torch's single-tensor implementation (foreach=False) and
records the parameters after every step.
"""
import json
import os

import numpy as np
import torch

STEPS = 25
HERE = os.path.dirname(os.path.abspath(__file__))

# (id, torch optimizer class name, kwargs, scheduler or None)
CASES = [
    ("sgd", "SGD", dict(lr=0.1), None),
    ("sgd_momentum", "SGD", dict(lr=0.1, momentum=0.9), None),
    ("sgd_dampening", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.5), None),
    ("sgd_nesterov_wd", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), None),
    ("sgd_wd", "SGD", dict(lr=0.05, weight_decay=0.1), None),
    ("adam_default", "Adam", dict(), None),
    ("adam", "Adam", dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), None),
    ("adamw_default", "AdamW", dict(), None),
    ("adamw", "AdamW", dict(lr=0.05, betas=(0.85, 0.95), eps=1e-7, weight_decay=0.1), None),
    ("rmsprop_default", "RMSprop", dict(), None),
    ("rmsprop_momentum_wd", "RMSprop",
     dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.9), None),
    ("sgd_multistep", "SGD", dict(lr=0.1, momentum=0.9),
     ("MultiStepLR", dict(milestones=[5, 10, 15], gamma=0.5))),
    ("adam_cosine", "Adam", dict(lr=0.05), ("CosineAnnealingLR", dict(T_max=20, eta_min=1e-3))),
    ("adam_amsgrad", "Adam", dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True), None),
    ("adamw_amsgrad", "AdamW", dict(lr=0.05, betas=(0.3, 0.9), amsgrad=True), None),
    ("rmsprop_centered", "RMSprop", dict(lr=0.01, alpha=0.9, centered=True), None),
    ("rmsprop_centered_momentum", "RMSprop",
     dict(lr=0.01, alpha=0.3, eps=1e-6, weight_decay=0.1, momentum=0.9, centered=True), None),
    ("sgd_maximize", "SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True), None),
    ("adam_maximize", "Adam", dict(lr=0.05, weight_decay=0.1, maximize=True), None),
]


def main():
    rng = np.random.default_rng(20240610)
    init = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    grads = {k: rng.standard_normal((STEPS,) + v.shape) for k, v in init.items()}
    arrays = {f"init/{k}": v for k, v in init.items()}
    arrays.update({f"grads/{k}": v for k, v in grads.items()})
    for case_id, cls, kwargs, sched in CASES:
        for dtype in ("float64", "float32"):
            params = {k: torch.tensor(v.astype(dtype), requires_grad=True) for k, v in init.items()}
            opt = getattr(torch.optim, cls)(list(params.values()), foreach=False, **kwargs)
            scheduler = getattr(torch.optim.lr_scheduler, sched[0])(opt, **sched[1]) \
                if sched else None
            traj = {k: [] for k in params}
            for t in range(STEPS):
                for k, p in params.items():
                    p.grad = torch.tensor(grads[k][t].astype(dtype))
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                for k, p in params.items():
                    traj[k].append(p.detach().numpy().copy())
            for k in params:
                arrays[f"{case_id}/{dtype}/{k}"] = np.stack(traj[k])
    np.savez_compressed(os.path.join(HERE, "optim_torch.npz"), **arrays)
    meta = {"torch_version": torch.__version__, "steps": STEPS,
            "cases": [{"id": c, "torch": cls, "kwargs": kw,
                       "scheduler": None if s is None else {"name": s[0], "kwargs": s[1]}}
                      for c, cls, kw, s in CASES]}
    with open(os.path.join(HERE, "optim_torch.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
