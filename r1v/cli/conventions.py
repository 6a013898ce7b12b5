"""What every `r1v` subcommand shares on the command line: the parser class (defaults and an example in every
`--help`), the MODEL argument (positional, or `-m MODEL` as llama.cpp spells it) and quant names in any case.

The canonical long flag of each option stays the Python argument's name (`--n-ctx` is `LoadOptions.n_ctx`);
the spellings people know from llama.cpp (`-c/--ctx-size`, `-t`, `-n/--n-predict`, `--temp`, `-ngl`) and
vLLM (`--max-model-len`) are extra option strings of the same option, so they land in the same field.
Imports only argparse: `r1v --help` stays fast.
"""
from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["HelpFormatter", "Parser", "add_model_positional", "quant_name", "set_epilogs", "subparsers"]

Check = Callable[[argparse.Namespace, "Parser"], None]

# Actions whose default says nothing a reader needs (a flag's off state, a sub-command's dest).
_NO_DEFAULT_SHOWN = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                     argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction,
                     argparse._AppendConstAction, argparse._CountAction)


def format_default(value: Any) -> str:
    """A default as a user would type it: lists space-separated, paths as text."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with each option's default appended (as ArgumentDefaultsHelpFormatter does) where the
    default means something (not None, not a flag's off state) and the help text does not already say it; the
    description and the examples (epilog) keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.help is argparse.SUPPRESS or "%(default)" in text:
            return text
        if isinstance(action, _NO_DEFAULT_SHOWN) or action.default is None or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        shown = format_default(action.default)
        if re.search(rf"default:? {re.escape(shown)}\b", text):  # the text says it already
            return text
        shown = shown.replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-parsers (argparse makes them of the parent's class) use HelpFormatter, and
    which runs `checks` after parsing: rules that span several options (MODEL given once, as positional or -m)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.checks: list[Check] = []
        self.intermixed = False  # set by add_model_positional: see _parse_intermixed

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parse = self._parse_intermixed if self.intermixed else super().parse_known_args
        namespace, extras = parse(args, namespace)
        for check in self.checks:
            check(namespace, self)
        return namespace, extras

    def _parse_intermixed(self, args: Any, namespace: Any) -> tuple[argparse.Namespace, list[str]]:
        """The options first, then all positional strings matched together, so options may stand anywhere
        between them. This is argparse's parse_known_intermixed_args, less its loss of `--` before Python 3.13
        (`-p hi -- -x.gguf` lost MODEL): what follows the first `--` stays out of the options' pass."""
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        usage = self.usage
        self.usage = usage or self.format_usage()[len("usage: "):]  # errors and --help show every positional
        try:
            with _swapped(self._get_positional_actions(), nargs=argparse.SUPPRESS, default=argparse.SUPPRESS):
                namespace, rest = super().parse_known_args(args[:cut], namespace)
            with _swapped(self._get_optional_actions(), required=False), \
                    _swapped(self._mutually_exclusive_groups, required=False):  # they were checked in the first pass
                return super().parse_known_args(rest + args[cut:], namespace)
        finally:
            self.usage = usage


@contextmanager
def _swapped(objects: list[Any], **values: Any) -> Iterator[None]:
    """Set these attributes of each object while the block runs (argparse reads them as it parses)."""
    saved = [{name: getattr(obj, name) for name in values} for obj in objects]
    try:
        for obj in objects:
            for name, value in values.items():
                setattr(obj, name, value)
        yield
    finally:
        for obj, old in zip(objects, saved):
            for name, value in old.items():
                setattr(obj, name, value)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-commands of `parser` by name (argparse keeps them in its _SubParsersAction)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def set_epilogs(parser: argparse.ArgumentParser, epilog: Callable[[str], str | None], path: str = "") -> None:
    """Give `parser` and every sub-command below it the epilog `epilog(path)` ("convert gguf" for `r1v convert
    gguf`), where the command has none of its own."""
    if parser.epilog is None:
        parser.epilog = epilog(path)
    for name, sub in subparsers(parser).items():
        set_epilogs(sub, epilog, f"{path} {name}".strip())


def quant_name(text: str) -> str:
    """A quant type as argparse `type=`: llama.cpp and Hugging Face write Q4_K_M, our files q4_k_m; both work."""
    return text.strip().lower()


_MODEL_OPTION = "model_option"


def add_model_positional(parser: argparse.ArgumentParser, help_text: str) -> None:
    """MODEL as the first positional argument, or as `-m/--model MODEL` (llama.cpp's spelling); either lands in
    `args.model`. Giving neither, or both, is a usage error."""
    if not isinstance(parser, Parser):  # no place for the check that merges the two: the positional alone
        parser.add_argument("model", metavar="MODEL", help=help_text)
        return
    parser.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL", help=help_text)
    parser.add_argument("-m", "--model", dest=_MODEL_OPTION, default=argparse.SUPPRESS, metavar="MODEL",
                        help="MODEL given as an option, as llama.cpp's tools take it")
    parser.checks.append(_one_model)
    # argparse matches positionals chunk by chunk between options: in `eval MODEL --quant Q DATA` the first chunk
    # (MODEL alone) would go to DATA, the optional MODEL left empty. Intermixed parsing takes the options out
    # first, then matches all positionals at once: the first is MODEL unless -m took its place. (A parser with
    # sub-commands, as the top-level one, could not be parsed so; the ones taking MODEL have none.)
    parser.intermixed = True


def _one_model(args: argparse.Namespace, parser: Parser) -> None:
    option = vars(args).pop(_MODEL_OPTION, None)
    if option is not None and hasattr(args, "model"):
        parser.error(f"MODEL given twice ({args.model!r} and -m {option!r}): give it once")
    if option is not None:
        args.model = option
    if not hasattr(args, "model"):
        parser.error("the following arguments are required: MODEL (or -m MODEL)")
