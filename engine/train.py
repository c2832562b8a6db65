"""`python -m engine.train [--config FILE.toml] [--section.key value ...] [--out DIR] [--overwrite | --resume]`

With no arguments: the embedded default, the whole three-phase protocol on the built-in synthetic
multilingual suite with a tiny encoder, on CPU, in minutes. With a recipe (recipes/*.toml) and
`--data.dir DIR` (or the Hugging Face hub): the real study on XTREME / XTREME-R. Configuration and data
errors (a missing file, an unknown task or language, a malformed record) exit with code 2 and write nothing.
"""
from __future__ import annotations

import sys

USAGE = __doc__.strip().splitlines()[0].strip("`") + """

options:
  --config FILE        a TOML file of sections ([run], [world], [model], [pretrain], [intermediate],
                       [target], [protocol], [eval]); see README.md
  --out DIR            output folder (default runs/<run.name>); it must be new or empty
  --overwrite          replace the earlier run held in --out
  --resume             continue the killed run in --out (same configuration): finished conditions and phases
                       are kept, the interrupted phase continues from its last checkpoint
  --section.key VALUE  override one setting, e.g. --target.epochs 2 --protocol.conditions baseline,syn-mnli
  --print-config       print the resolved configuration as TOML and exit
  -h, --help           this help
"""


def parse_args(argv: list[str], flags: dict | None = None) -> tuple[str | None, list[tuple[str, str]], bool]:
    """(config file, overrides, --print-config); flags such as --overwrite are recorded in `flags`."""
    from .config import ConfigError

    config, overrides, print_only = None, [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--print-config":
            print_only, i = True, i + 1
            continue
        if arg in ("--overwrite", "--resume"):
            if flags is None:
                raise ConfigError(f"{arg} is not an option here")
            flags[arg[2:]], i = True, i + 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options start with -- (see --help)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{name} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if name == "config":
            config = value
        elif name == "out":
            overrides.append(("run.out", value))
        elif "." in name:
            overrides.append((name, value))
        else:
            raise ConfigError(f"unknown option --{name} (see --help)")
    return config, overrides, print_only


def main(argv: list[str] | None = None) -> int:
    from eval.loaders import DataUnavailable, FormatError

    from . import distributed
    from .config import ConfigError, load, to_toml
    from .protocol import plan, run_study
    from .trainer import NonFiniteTraining

    try:
        flags = {"overwrite": False, "resume": False}
        path, overrides, print_only = parse_args(sys.argv[1:] if argv is None else argv, flags)
        cfg = load(path, overrides)
        if print_only:
            p = plan(cfg)
            cfg.protocol.conditions, cfg.protocol.targets = list(p.conditions), [t.name for t in p.targets]
            print(to_toml(cfg))
            return 0
        if flags["overwrite"] and flags["resume"]:
            raise ConfigError("--overwrite and --resume: choose one")
        run_study(cfg, overwrite=flags["overwrite"], resume=flags["resume"])
        distributed.shutdown()  # under torchrun: all ranks meet, then the process group closes cleanly
    except (ConfigError, DataUnavailable, FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteTraining as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.abandon()  # an error on one rank: close the process group without waiting for the others
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
