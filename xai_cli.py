"""The command lines' edge, shared by every script: one wrapper that ends a user's mistake
in one line and an exit status instead of a traceback, and argparse types and checks
whose messages name the flag.

A user's mistake is an error the project raises on purpose, with a message written for
the user: a bad value, a missing, corrupt or incompatible file, colliding runs, a data
fault, a diverged run. It prints `<script>: error: <message>` to stderr and exits with
status 2 (values and files that don't fit) or 1 (files that can't be read or written,
data faults, a diverged run). An exception raised inside a library (JAX, Flax, numpy) or
of any other type is a bug, and keeps its traceback.
"""

import argparse
import ast
import functools
import inspect
import linecache
import os
import signal
import sys
import threading
from pathlib import Path

from cifar10_data import DataError
from xai_cache import enable_compilation_cache

ROOT = Path(__file__).resolve().parent
_PROJECT_FOLDERS = (ROOT, ROOT / "benchmarks")

# The exit status of each kind of user error; the first matching class wins.
EXIT_STATUS = ((DataError, 1), (FloatingPointError, 1), (OSError, 1), (ValueError, 2),
               (TypeError, 2))
INTERRUPTED = 130  # what shells report for a process stopped by Ctrl-C


def raised_by_project(error: BaseException) -> bool:
    """True when a `raise` statement in one of our own files raised `error`.

    The innermost frame must be ours and stand on a `raise`: JAX hides its own frames
    from tracebacks, so an error raised inside JAX on behalf of one of our lines would
    otherwise look like ours.
    """
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return (Path(filename).resolve().parent in _PROJECT_FOLDERS
            and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise "))


def exit_status(error: BaseException):
    """The exit status for a user's mistake, or None for a bug (keep its traceback)."""
    for kind, status in EXIT_STATUS:
        if isinstance(error, kind):
            return status if raised_by_project(error) else None
    return None


# A process joins a multi-process run (one per host, or several on one machine) when the
# first is set; the other two are then required. See docs/scaling.md.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def start_distributed() -> bool:
    """Joins the multi-process run that `DISTRIBUTED_ENV` describes, before anything
    starts a JAX backend (`jax.distributed.initialize` must come first); on the CPU the
    processes talk through gloo. Returns whether this is a multi-process run.

    Every process then sees every process's devices (`jax.devices()`), and jitted
    programs over a mesh of them run on all at once; `jax.process_index()` is this
    process's place, and only process 0 writes files.
    """
    address = os.environ.get(DISTRIBUTED_ENV[0])
    if not address:
        return False
    values = {}
    for name in DISTRIBUTED_ENV[1:]:
        text = os.environ.get(name, "")
        if not text.isdigit():
            raise ValueError(f"{name} must be set to an int when {DISTRIBUTED_ENV[0]} is "
                             f"set (a multi-process run), got {text!r}")
        values[name] = int(text)
    count, index = values["JAX_NUM_PROCESSES"], values["JAX_PROCESS_ID"]
    if count < 1 or index >= count:
        raise ValueError(f"JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES = {count}), got "
                         f"{index}")
    import jax  # noqa: PLC0415 (the command lines' helpers need no JAX otherwise)

    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    return True


def is_writer() -> bool:
    """True in the process that writes files: the only one, or process 0 of many."""
    import jax  # noqa: PLC0415

    return jax.process_index() == 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def entry_point(main):
    """Wraps a script's `main(argv=None)`: the project's own errors print one line and
    exit 2 or 1; Ctrl-C and SIGTERM print one line (with what the KeyboardInterrupt
    says, e.g. how to resume) and exit 130. The run joins a multi-process run when the
    environment describes one and uses the persistent compilation cache."""
    prog = Path(inspect.getsourcefile(main)).name

    @functools.wraps(main)
    def run(argv=None):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            start_distributed()
            enable_compilation_cache()
            return main(argv)
        except KeyboardInterrupt as e:
            print(f"{prog}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr,
                  flush=True)
            raise SystemExit(INTERRUPTED) from None
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a user's mistake
            status = exit_status(e)
            if status is None:
                raise
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(status) from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return run


def int_at_least(minimum: int):
    """An argparse `type` for ints >= `minimum`; argparse names the flag in its error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


def add_input_flags(parser, output_dir: str):
    """The flags every checkpoint script shares: --checkpoint, --data-dir, --output-dir."""
    parser.add_argument("--checkpoint", default=None,
                        help="default: cifar10_model.pkl when it exists, else the pretrained one")
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 folder; default: $CIFAR10_DIR, then tfds, then download")
    parser.add_argument("--output-dir", default=output_dir,
                        help="where the files go (default: %(default)s)")


def _flag(method: str, option: str) -> str:
    return "--" + f"{method}-{option}".replace("_", "-").replace("+", "p")


def _option_type(default):
    """argparse's `type` for an option of this default: int, float or str."""
    if isinstance(default, bool) or not isinstance(default, (int, float, str)):
        return None
    return type(default)


def add_method_flags(parser, methods, defaults=()):
    """A flag per option of every registry method, generated from its `Option`s:
    `--<method>-<option>` (e.g. `--integrated-gradients-steps 16`, `--lrp-composite
    epsilon_plus_flat`), with the option's choices and help; the layer options are the
    scripts' shared `--layer`. An option's deprecated `alias` (the scripts' spelling
    before the registry made the flags, e.g. `--ig-steps`) still works and says so.

    Args:
        methods: the registry, `xai_visualizations.METHODS` (passed in, so that a script
            that needs no explainer imports none).
        defaults: (method, option, value) triples over the registry's defaults for this
            script (shown by --help, and returned by `method_options` when not given).
    """
    group = parser.add_argument_group(
        "method options", "each method's options (xai_visualizations.METHODS); the "
        "defaults are the registry's unless this script says otherwise")
    ours = {(m, o): v for m, o, v in defaults}
    aliases = {}
    for method, spec in methods.items():
        for name, option in spec.options.items():
            kind = _option_type(option.default)
            if name == "layer" or kind is None:
                continue
            default = ours.get((method, name), option.default)
            group.add_argument(_flag(method, name), dest=f"option:{method}:{name}",
                               type=kind, choices=option.choices, default=None,
                               metavar=None if option.choices else kind.__name__.upper(),
                               help=f"{spec.label}: {option.help or name} (default: "
                                    f"{default})")
            if option.alias:
                aliases.setdefault(option.alias, (kind, []))[1].append((method, name))
    for alias, (kind, targets) in aliases.items():
        group.add_argument("--" + alias, dest=f"alias:{alias}", type=kind, default=None,
                           metavar=kind.__name__.upper(),
                           help="deprecated: " + ", ".join(_flag(m, o) for m, o in targets))


def method_options(parser, args, methods, defaults=(), image_shape=(32, 32, 3)) -> tuple:
    """The (method, option, value) triples that `args` (from `add_method_flags`) and the
    script's `defaults` set, each checked by its `Option` and by its method's `limits`
    for images of `image_shape`; a bad value is a `parser.error` naming the flag. A
    deprecated alias prints a line to stderr, and yields to the new flag where both are
    given."""
    given = {(m, o): v for m, o, v in defaults}
    flags = vars(args)
    for dest, value in flags.items():
        if dest.startswith("alias:") and value is not None:
            alias = dest.split(":", 1)[1]
            targets = [(m, o) for m, spec in methods.items()
                       for o, option in spec.options.items() if option.alias == alias]
            print(f"{parser.prog}: --{alias} is deprecated; use "
                  f"{' and '.join(_flag(m, o) for m, o in targets)}", file=sys.stderr)
            given.update(dict.fromkeys(targets, value))
    for dest, value in flags.items():
        if dest.startswith("option:") and value is not None:
            _, method, name = dest.split(":")
            given[(method, name)] = value
    for (method, name), value in given.items():
        try:
            given[(method, name)] = methods[method].options[name].check(name, value)
        except (ValueError, TypeError) as e:
            parser.error(f"{_flag(method, name)}: {e}")
    for method in dict.fromkeys(m for m, _ in given):
        spec = methods[method]
        options = {**spec.defaults, **{o: v for (m, o), v in given.items() if m == method}}
        why = spec.limits(options, image_shape) if spec.limits else None
        if why:  # the message starts with the option's name
            parser.error(f"{_flag(method, why.split()[0])}: {why}")
    return tuple((m, o, v) for (m, o), v in given.items())


def _keyword(text):
    """`name=value` -> (name, value), the value a Python literal (False, 0.5, 'x')."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"must be name=value, e.g. train=False, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f"the value of {name} must be a Python literal (False, 0.5, 'text'), got "
            f"{value!r}") from None


def add_apply_kwargs_flag(parser):
    """--apply-kwargs name=value ...: what the model's `apply` needs beside the images
    (e.g. train=False), as the explainers' and metrics' `apply_kwargs`."""
    parser.add_argument("--apply-kwargs", nargs="+", type=_keyword, default=(),
                        metavar="NAME=VALUE",
                        help="passed to model.apply with the images, e.g. train=False "
                             "(default: none)")


def load_card_checkpoint(config, doing: str):
    """(config with its checkpoint resolved, model, variables) for a card's command line:
    `config.checkpoint`, else the default checkpoint, loaded; unless `config.quiet`, one
    line says which (e.g. 'evaluating pretrained/cifar10_cnn.pkl: ...')."""
    import dataclasses  # noqa: PLC0415

    from checkpoints import default_checkpoint, describe_checkpoint, load_checkpoint  # noqa: PLC0415

    config = dataclasses.replace(config, checkpoint=str(config.checkpoint
                                                        or default_checkpoint()))
    model, variables = load_checkpoint(config.checkpoint)
    if not config.quiet:
        print(f"{doing} {describe_checkpoint(config.checkpoint)}")
    return config, model, variables


def check_writable(path, name: str, *, folder: bool = False):
    """Refuses, before any work is done, an output `path` that cannot be written.

    `name` is the flag that gave it. A folder is checked when `folder`; nothing is
    created here.
    """
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{name} must be a {kind} path, got {str(path)!r}, which is a "
                         f"{'folder' if path.is_dir() else 'file'}")
    existing = path if folder and path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r} cannot be written: {str(existing)!r} is a "
                         "file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {str(path)!r} cannot be written: no permission to "
                              f"write in {str(existing)!r}")


def describe_device() -> str:
    """What ran a measurement, for reports: e.g. 'gpu: NVIDIA H100 80GB HBM3 x1
    (jax 0.11.0)' or 'cpu: 2 cores x1 (jax 0.10.2)'."""
    import jax  # noqa: PLC0415 (argument checks need no JAX)

    device = jax.devices()[0]
    kind = f"{os.cpu_count()} cores" if device.platform == "cpu" else device.device_kind
    return f"{device.platform}: {kind} x{jax.device_count()} (jax {jax.__version__})"

