"""IR -> LLVM -> native code (the next stage of the pipeline)."""


def compile_function(fn):
    raise NotImplementedError("native code generation is not implemented yet; set "
                              "tracejit.config.backend = 'interpreter'")
