"""IR -> LLVM -> native code: the schedule (fusion groups, buffer plan), fused loop lowering,
loop-nest kernels, and the runtime that compiles a module and calls it."""


def compile_function(fn, cache=None, donate=None):
    """Compile an (optimized) ir.Function to a NativeFunction (see codegen/runtime.py), through
    the persistent compile cache `cache` (see codegen/cache.py; None: the default one).
    `donate` ({output index: parameter index}) stores outputs into parameters' arrays."""
    from .runtime import compile_function as _compile
    return _compile(fn, cache=cache, donate=donate)


def describe(fn, donate=None) -> str:
    """The IR of `fn` annotated with its kernels (fusion groups), the arena size and what the
    backward pass keeps alive, without compiling it: the plan that compiling it now would run
    (the thread count of tracejit's settings, TRACEJIT_NO_EPILOGUES)."""
    from ..ir.core import print_function
    from . import parallel, schedule
    from .runtime import plan_for
    p = plan_for(fn, parallel.default_threads(), donate)
    return "\n".join([print_function(fn, annotate=schedule.annotate(p)), schedule.summary(p)])


def record(cls=None, /, *, frozen: bool = False, kw_only: bool = False):
    """`@dataclasses.dataclass` for codegen's plain records (`@record`, `@record(frozen=True)`,
    `kw_only=True`), built without running `exec` for every method: importing the kernels
    defines ~40 records, and dataclass's generated methods cost ~60 ms of the first compile
    (half of importing codegen). The same contract: `__init__` (defaults, `field(
    default_factory=...)`, keyword-only fields, `__post_init__`), field-wise `__eq__` against the
    same class, `__hash__` of the fields when frozen (None, unhashable, when not), `__repr__`,
    frozen instances refusing assignment (`dataclasses.FrozenInstanceError`), and
    `dataclasses.fields` / `replace` / `is_dataclass` work on them. Methods the class body
    defines are kept. No method is generated as code: construction costs ~2 us more than a
    dataclass's (a compile makes a few hundred records)."""
    if cls is None:
        return lambda c: _make_record(c, frozen, kw_only)
    return _make_record(cls, frozen, kw_only)


def _make_record(cls, frozen: bool, kw_only: bool):
    import dataclasses
    import operator
    fields = {}
    for base in reversed(cls.__mro__[1:]):   # inherited fields first, as dataclass orders them
        fields.update(getattr(base, "__dataclass_fields__", {}))
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        given = cls.__dict__.get(name, dataclasses.MISSING)
        f = given if isinstance(given, dataclasses.Field) else dataclasses.field(default=given)
        if not (f.init and f.repr and f.compare) or f.hash is not None:
            raise TypeError(f"record {cls.__name__}.{name}: field(init=, repr=, compare=, "
                            "hash=) are not supported: use dataclasses.dataclass")
        if f.default is dataclasses.MISSING and isinstance(given, dataclasses.Field):
            delattr(cls, name)   # a factory's field has no class attribute (as in dataclass)
        f.name, f.type, f._field_type = name, annotation, dataclasses._FIELD
        if f.kw_only is dataclasses.MISSING:
            f.kw_only = kw_only
        fields[name] = f
    names = tuple(fields)
    cls.__dataclass_fields__ = fields

    init = _record_init(cls, fields.values(), frozen, dataclasses.MISSING)

    values = operator.attrgetter(*names) if names else (lambda self: ())

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return values(self) == values(other)

    def __repr__(self):
        return f"{type(self).__qualname__}(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in names) + ")"

    methods = {"__init__": init, "__eq__": __eq__, "__repr__": __repr__}
    if frozen:
        def __hash__(self):
            return hash(values(self))

        def __setattr__(self, name, value):
            if type(self) is cls or name in fields:
                raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)

        def __delattr__(self, name):
            if type(self) is cls or name in fields:
                raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)
        methods.update(__hash__=__hash__, __setattr__=__setattr__, __delattr__=__delattr__)
    elif "__eq__" not in cls.__dict__:
        methods["__hash__"] = None   # a mutable record compares by value: unhashable
    for name, method in methods.items():
        # (a body defining __eq__ alone gets __hash__ = None from Python: not a definition)
        if name not in cls.__dict__ or (name == "__hash__" and cls.__dict__[name] is None):
            if method is not None:
                method.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, method)
    return cls


def _record_init(cls, fields, frozen: bool, missing):
    """A record's `__init__(self, *positional fields, *, keyword-only fields)`, with dataclass's
    checks and messages for missing, unknown, repeated and surplus arguments."""
    names = [f.name for f in fields]
    positional = [f.name for f in fields if not f.kw_only]
    defaults = {f.name: f.default for f in fields if f.default is not missing}
    factories = {f.name: f.default_factory for f in fields if f.default_factory is not missing}
    known = set(names)
    assign = object.__setattr__ if frozen else setattr
    post_init = hasattr(cls, "__post_init__")
    where = f"{cls.__qualname__}.__init__()"

    def __init__(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{where} takes {len(positional) + 1} positional arguments but "
                            f"{len(args) + 1} were given")
        given = dict(zip(positional, args))
        for name, value in kwargs.items():
            if name not in known:
                raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
            if name in given:
                raise TypeError(f"{where} got multiple values for argument {name!r}")
            given[name] = value
        for name in names:
            if name in given:
                value = given[name]
            elif name in defaults:
                value = defaults[name]
            elif name in factories:
                value = factories[name]()
            else:
                raise TypeError(f"{where} missing required argument: {name!r}")
            assign(self, name, value)
        if post_init:
            self.__post_init__()
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__
