"""torchgc's user-facing options: their defaults, their environment variables, and validation.

Precedence, from strongest to weakest: a key in a call's ``gradient_checkpointing_kwargs``, an
argument given to ``torchgc.patch()`` (or the launcher), the ``TORCHGC_*`` environment variable,
the default. ``None`` as an argument means "not given". Every invalid value raises a ValueError
that names the function, the argument, what was expected and what was given.
"""

import dataclasses
import difflib
import os
import re
import warnings
from typing import Any, Callable, FrozenSet, Mapping, Optional

STRATEGIES = ("auto", "checkpoint", "offload", "selective")
# Offloading a smaller input costs more in copy latency than it saves: Unsloth measured no gain
# below about 512 tokens, which is 2 MiB of bf16 activations at hidden size 2048.
DEFAULT_MIN_OFFLOAD_BYTES = 2 * 1024 * 1024

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Options:
    strategy: str = "auto"
    use_reentrant: Optional[bool] = None  # None: follow the installed transformers
    only_trainable: bool = True
    prefetch: bool = True
    min_offload_bytes: Optional[int] = None  # None: torchgc.checkpoint's default
    max_host_bytes: Optional[int] = None  # None: no cap on the host memory offloading uses
    upcast_layernorm: bool = False
    fused_norm: bool = False
    upcast_lmhead_output: bool = False
    memory_budget: Optional[Any] = None  # None: checkpoint every layer; a fraction or a byte count: plan per layer
    every_n_layers: int = 1  # checkpoint decoder layers 0, n, 2n, ... (transformers' pattern); the rest keep everything
    # The options given as arguments or set in the environment, as opposed to left at their
    # defaults, so that a framework's own settings (LLaMA-Factory's flags) can take the defaults' place.
    given: FrozenSet[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options) if f.name != "given")
DEFAULTS = Options()
# The options of one layer call: torchgc.checkpoint's arguments, and what the layers' checkpoint
# object runs with.
CALL_OPTIONS = ("strategy", "use_reentrant", "only_trainable", "prefetch", "min_offload_bytes", "max_host_bytes")


def env_var(name: str) -> str:
    return "TORCHGC_" + name.upper()


# TORCHGC_* variables that are not options: read by setup.py when torchgc is built, and
# TORCHGC_REPORT, which `torchgc run --report` sets for the processes it starts.
OTHER_VARIABLES = ("TORCHGC_CUDA", "TORCHGC_BUILD_TESTS", "TORCHGC_SANITIZE", "TORCHGC_BUILD_DIR", "TORCHGC_REPORT")
REPORT_VARIABLE = "TORCHGC_REPORT"
_warned_unknown = set()


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """One warning per TORCHGC_* variable torchgc does not read (a typo silently does nothing)."""
    known = [env_var(name) for name in OPTION_NAMES] + list(OTHER_VARIABLES)
    for name in sorted(environ):
        if name.startswith("TORCHGC_") and name not in known and name not in _warned_unknown:
            _warned_unknown.add(name)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            warnings.warn(f"torchgc: the environment variable {name} is not one torchgc reads; {hint}"
                          f"torchgc reads {', '.join(known)}", stacklevel=3)


def _choice(value: Any) -> Optional[str]:
    return f"one of {', '.join(repr(s) for s in STRATEGIES)}" if value not in STRATEGIES else None


def _boolean(value: Any) -> Optional[str]:
    return "True or False" if not isinstance(value, bool) else None


def _optional_boolean(value: Any) -> Optional[str]:
    return "True, False or None" if value is not None and not isinstance(value, bool) else None


def _byte_count(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return None
    return "None, an int >= 0 or a size such as '8GiB'"


def _positive_int(value: Any) -> Optional[str]:
    return "an int >= 1" if isinstance(value, bool) or not isinstance(value, int) or value < 1 else None


def _budget(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, float) and 0 < value <= 1) or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return "None, a fraction in (0, 1] of the layers' activation memory without checkpointing (such as 0.3), or bytes (an int > 0 or a size such as '12GiB')"


def parse_budget(text: str) -> Optional[Any]:
    """A fraction from "0.3", bytes from "12GiB" or "4096"; None when `text` is neither."""
    try:
        fraction = float(text)
    except ValueError:
        return parse_size(text)
    return fraction if "." in text or "e" in text.lower() else parse_size(text)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> Optional[int]:
    """Bytes from "4096", "512MiB", "8GiB", "1.5GB" (KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB
    of 1000); None when `text` is not a size."""
    match = _SIZE.match(text)
    if match is None:
        return None
    number, unit = match.group(1), _UNITS[(match.group(2) or "").lower()]
    if unit == 1 and "." in number:
        return None  # a fraction of a byte
    return int(float(number) * unit)


# option -> check returning what was expected when the value is invalid, else None
_CHECKS: Mapping[str, Callable[[Any], Optional[str]]] = {
    "strategy": _choice,
    "use_reentrant": _optional_boolean,
    "only_trainable": _boolean,
    "prefetch": _boolean,
    "min_offload_bytes": _byte_count,
    "max_host_bytes": _byte_count,
    "upcast_layernorm": _boolean,
    "fused_norm": _boolean,
    "upcast_lmhead_output": _boolean,
    "memory_budget": _budget,
    "every_n_layers": _positive_int,
}


def check(function: str, name: str, value: Any, *, where: Optional[str] = None) -> Any:
    """Returns ``value`` if valid for option ``name``, else raises ValueError. ``where`` names the
    argument as the caller sees it (default: ``argument 'name'``)."""
    if _CHECKS[name] is _byte_count and isinstance(value, str):
        value = parse_size(value) if parse_size(value) is not None else value
    if name == "memory_budget" and isinstance(value, str):
        value = parse_budget(value) if parse_budget(value) is not None else value
    expected = _CHECKS[name](value)
    if expected is not None:
        where = where or f"argument {name!r}"
        raise ValueError(f"{function}: {where} must be {expected}; got {value!r}")
    return value


def _parse_env(function: str, name: str, text: str) -> Any:
    where = f"environment variable {env_var(name)}"
    word = text.strip().lower()
    if name == "strategy":
        return check(function, name, word, where=where)
    if _CHECKS[name] is _byte_count:
        if word in ("", "none", "default"):
            return None
        if parse_size(word) is None:
            raise ValueError(f"{function}: {where} must be a non-negative integer, a size such as '8GiB', or 'none'; got {text!r}")
        return parse_size(word)
    if name == "memory_budget":
        return None if word in ("", "none", "default") else check(function, name, word, where=where)
    if name == "every_n_layers":
        if word in ("", "default"):
            return None
        return check(function, name, int(word) if word.isdigit() else text, where=where)
    if name == "use_reentrant" and word in ("", "none", "auto", "default"):
        return None
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    allowed = ", ".join(_TRUE + _FALSE) + (", auto" if name == "use_reentrant" else "")
    raise ValueError(f"{function}: {where} must be one of {allowed}; got {text!r}")


def resolve(function: str, given: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> Options:
    """Options from ``given`` (None entries mean not given), then the environment, then defaults."""
    values = _given_or_set(function, given, os.environ if environ is None else environ)
    return checked_together(function, dataclasses.replace(DEFAULTS, **values, given=frozenset(values)))


def _given_or_set(function: str, given: Mapping[str, Any], environ: Mapping[str, str]) -> dict:
    """The options given (None entries mean not given) or else set in the environment, validated."""
    _warn_unknown_variables(environ)
    unknown = set(given) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"{function}: unknown option(s) {sorted(unknown)}; valid options are {', '.join(OPTION_NAMES)}")
    values = {}
    for name in OPTION_NAMES:
        value = given.get(name)
        if value is not None:
            values[name] = check(function, name, value)
        elif environ.get(env_var(name)) is not None:
            values[name] = _parse_env(function, name, environ[env_var(name)])
    return values


def fill_in(function: str, options: Options, settings: Mapping[str, Any]) -> Options:
    """``options`` with a framework's own ``settings`` (LLaMA-Factory's flags, already checked) in
    place of torchgc's defaults: for each option neither given nor set in the environment."""
    below = {name: value for name, value in settings.items() if name not in options.given}
    return checked_together(function, dataclasses.replace(options, **below))


def override(function: str, options: Options, keys: Mapping[str, Any], argument: str) -> Options:
    """``options`` with the torchgc keys found in the mapping ``keys`` (a call's kwargs dict named
    ``argument``) replacing theirs, each validated."""
    values = {}
    for name in OPTION_NAMES:
        if name in keys:
            values[name] = check(function, name, keys[name], where=f"{argument}[{name!r}]")
    return checked_together(function, dataclasses.replace(options, **values))


def checked_together(function: str, options: Options) -> Options:
    """``options``, or a ValueError for options that contradict each other."""
    if options.every_n_layers != 1 and options.memory_budget is not None:
        raise ValueError(
            f"{function}: every_n_layers={options.every_n_layers} and memory_budget={options.memory_budget!r} both "
            "choose which layers to checkpoint; give one of them"
        )
    return options


# torchgc.checkpoint's arguments take Python values only: no sizes as text, no None for use_reentrant.
def _listed_strategy(value: Any) -> Optional[str]:
    return f"one of {', '.join(STRATEGIES)}" if value not in STRATEGIES else None


def _count(value: Any) -> Optional[str]:
    return "None or an int >= 0" if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0) else None


_CALL_CHECKS: Mapping[str, Callable[[Any], Optional[str]]] = {
    "strategy": _listed_strategy,
    "use_reentrant": _boolean,
    "preserve_rng_state": _boolean,
    "only_trainable": _boolean,
    "prefetch": _boolean,
    "min_offload_bytes": _count,
    "max_host_bytes": _count,
}


def check_call_argument(function: str, name: str, value: Any, *, where: Optional[str] = None) -> Any:
    """Returns ``value`` if valid for the checkpoint call argument ``name`` (CALL_OPTIONS and
    preserve_rng_state), else raises ValueError."""
    expected = _CALL_CHECKS[name](value)
    if expected is not None:
        raise ValueError(f"{function}: {where or f'argument {name!r}'} must be {expected}; got {value!r}")
    return value


def call_options(function: str, arguments: Mapping[str, Any]) -> Options:
    """The Options of a checkpoint call's ``arguments`` (every name of CALL_OPTIONS, and
    preserve_rng_state if present), each checked."""
    for name in _CALL_CHECKS:
        if name in arguments:
            check_call_argument(function, name, arguments[name])
    return Options(**{name: arguments[name] for name in CALL_OPTIONS})
