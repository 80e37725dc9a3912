"""`vllm serve` command lines carried over to `dynvllm` (pure: argv in, argv out).

Before Typer reads a command line, the forms of vLLM's server that a flag-per-setting parser
cannot express are rewritten into dynvllm's flags:

- the model as a positional argument: `dynvllm serve agg MODEL` means `--model MODEL`;
- several served names, `--served-model-name a b c`: the model is served as `a`, and `b` and
  `c` become aliases of it (`--model-aliases b=a,c=a`, merged with any given);
- several API keys, `--api-key k1 k2`: dynvllm's `--api-key k1,k2`;
- `--config FILE.yaml` in vLLM's format: each key is a flag name and its value the flag's value
  (true: the flag, false: `--no-` the flag, a list: the flag and each item, a mapping: JSON).
  They go in front of the command line's own flags, so a flag given explicitly wins (the last
  value of a flag is the one taken, by Typer and by vLLM's parser alike).
"""

from __future__ import annotations

import json
import os
from typing import Any

from dynvllm.settings_base import env_name


class CommandLineError(ValueError):
    """A command line that cannot be read; the message names the flag or file and the fix."""


def _leading(argv: list[str]) -> int:
    """How many tokens name the command (and, for `serve NAME`, the positional model)."""
    n = 0
    while n < len(argv) and not argv[n].startswith("-"):
        n += 1
    if argv[:1] == ["serve"]:
        return min(n, 3)
    return min(n, 2) if argv[:1] in (["lora"], ["model"]) else min(n, 1)


def config_args(path: str) -> list[str]:
    """Flags from a YAML file in vLLM's --config format."""
    import yaml

    if not path.endswith((".yaml", ".yml")):
        raise CommandLineError(f"--config {path}: the file must be YAML (.yaml or .yml), as vLLM's --config")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise CommandLineError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CommandLineError(f"--config {path}: not valid YAML: {exc}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise CommandLineError(f"--config {path}: expected a mapping of flag names to values")
    out: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        out += _flag(flag, value)
    return out


def _flag(flag: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *(str(v) for v in value)] if value else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if value is None:
        return []
    return [flag, str(value)]


def _expand_config(argv: list[str]) -> list[str]:
    at = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not at:
        return argv
    if len(at) > 1:
        raise CommandLineError("--config is given more than once; give one file")
    i = at[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv):
            raise CommandLineError("--config needs a file: --config FILE.yaml")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
    else:
        path, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1 :]
    lead = _leading(rest)
    added = config_args(path)
    if lead == 3:  # a positional model wins over the file's, as in vLLM
        added = _without(added, "--model")
    return rest[:lead] + added + rest[lead:]


def _without(args: list[str], flag: str) -> list[str]:
    out, i = [], 0
    while i < len(args):
        if args[i] == flag:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def _positional_model(argv: list[str]) -> list[str]:
    if argv[:1] != ["serve"] or len(argv) < 3 or argv[2].startswith("-"):
        return argv
    model = argv[2]
    if any(a == "--model" or a.startswith("--model=") for a in argv[3:]):
        raise CommandLineError(f"the model is given twice (as {model!r} and with --model): give it once")
    return [*argv[:2], "--model", model, *argv[3:]]


def _served_names(argv: list[str]) -> list[str]:
    """`--served-model-name a b c`: the first name served, the others as aliases of it."""
    out: list[str] = []
    extra: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a != "--served-model-name":
            out.append(a)
            i += 1
            continue
        names = []
        i += 1
        while i < len(argv) and not argv[i].startswith("-"):
            names.append(argv[i])
            i += 1
        if not names:
            raise CommandLineError("--served-model-name needs a name")
        out += [a, names[0]]
        extra = [(n, names[0]) for n in names[1:]]  # the last --served-model-name wins, as in vLLM
    if not extra:
        return out
    pairs = ",".join(f"{alias}={name}" for alias, name in extra)
    for k, a in enumerate(out):
        if a == "--model-aliases" and k + 1 < len(out):
            out[k + 1] = f"{out[k + 1]},{pairs}"
            return out
        if a.startswith("--model-aliases="):
            out[k] = f"{a},{pairs}"
            return out
    given = os.environ.get(env_name("model_aliases"))
    return [*out, "--model-aliases", f"{given},{pairs}" if given else pairs]


def _api_keys(argv: list[str]) -> list[str]:
    """`--api-key k1 k2` (vLLM takes several): dynvllm's comma-separated `--api-key k1,k2`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--api-key":
            keys = []
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                keys.append(argv[i])
                i += 1
            out.append(",".join(keys))
            continue
        i += 1
    return out


def normalize(argv: list[str]) -> list[str]:
    """dynvllm's command line for one that may use vLLM's forms (see the module's docstring)."""
    if "--help" in argv:
        return argv
    argv = _expand_config(list(argv))
    argv = _positional_model(argv)
    return _api_keys(_served_names(argv))
