"""Command-line flags from a config dataclass: the one helper behind the commands' flags.

Each field, written `name: type = flag(default, help, **metadata)`, becomes --name with the field's default. Its
metadata holds "help" (every flag has one) and optionally "choices", "aliases" (more flags for it) and "type" (an
argparse type such as in_range(float, 0, above=True), so a bad value is an error naming the flag before any work
starts). Booleans become --flag / --no-flag. `groups` maps a header of --help to the fields shown under it, in order;
fields in no group are listed first; fields in `skip` get no flag.
"""

import argparse
import dataclasses
import math


def flag(default, help, **metadata):
    """A config field with its flag's help and argparse metadata: lr: float = flag(5e-6, "peak learning rate")."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def option(name):
    return "--" + name.replace("_", "-")


def add_config_args(parser, config_class, groups=None, skip=()):
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.name not in skip}
    placed = {name for names in (groups or {}).values() for name in names}
    sections = [(parser, [n for n in fields if n not in placed])]
    sections += [(parser.add_argument_group(header), names) for header, names in (groups or {}).items()]
    for target, names in sections:
        for name in names:
            f = fields[name]
            if f.type in (bool, "bool"):
                target.add_argument(option(name), action=argparse.BooleanOptionalAction, default=f.default,
                                    help=f.metadata["help"])
            else:
                target.add_argument(option(name), *f.metadata.get("aliases", ()), default=f.default,
                                    type=f.metadata.get("type", type(f.default)), help=f.metadata["help"],
                                    choices=f.metadata.get("choices"))
    return parser


def given(argv, name):
    """Whether argv sets --name (as `--name value` or `--name=value`)."""
    return any(a == option(name) or a.startswith(option(name) + "=") for a in argv)


def in_range(cast, low, high=math.inf, above=False, below=False):
    """An argparse type: `cast`, then finite, >= low (> low when `above`) and <= high (< high when `below`); NaN
    fails every comparison."""
    def parse(text):
        x = cast(text)
        if not (math.isfinite(x) and (x > low if above else x >= low) and (x < high if below else x <= high)):
            bounds = f"{'>' if above else '>='} {low}" + (f" and {'<' if below else '<='} {high}"
                                                          if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return x
    parse.__name__ = cast.__name__  # argparse's "invalid float value" names it
    return parse
