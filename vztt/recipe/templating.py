"""Recipe templates: jinja2 in its sandbox, seeing the recipe's variables and nothing else.

A recipe is rendered by `vztt list` and `vztt show` as much as by a build, on
any machine that has the recipes directory, so a template must not be able to
run code: `{{ cycler.__init__.__globals__.os.popen('id').read() }}` or
`{{ lipsum.__globals__ ... }}` reach Python's os module through jinja2's
default globals. Here templates render in jinja2's SandboxedEnvironment
(no attribute starting with `_`, no unsafe method calls), with the globals
removed (no cycler, lipsum, joiner, namespace, range, dict), and
`{% include %}`, `{% import %}` and `{% extends %}` are refused before
rendering: there is no template loader, and a template reads no file.
Products of `*` and `**` are bounded, so a template cannot fill the memory.
"""

from __future__ import annotations

import operator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from vztt.base.errors import RecipeError

MAX_PRODUCT = 1 << 20          # items (or characters) a `*` may make
MAX_EXPONENT = 1024            # of `**`

_REFUSED = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
            nodes.Extends: "extends"}


class RecipeSandbox(SandboxedEnvironment):
    """jinja2's sandbox with no globals and bounded `*` and `**`."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
        self.globals.clear()

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > MAX_PRODUCT:
                    raise SecurityError(f"a product of more than {MAX_PRODUCT} items")
            return operator.mul(left, right)
        if op == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"an exponent above {MAX_EXPONENT}")
            return operator.pow(left, right)
        return super().call_binop(context, op, left, right)


_SANDBOX = RecipeSandbox()


def render(text: str, variables: dict[str, Any], where: str) -> str:
    """`text` rendered with `variables`; any failure is one RecipeError naming `where`."""
    try:
        tree = _SANDBOX.parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(f"{where}: template error: {e.message} (line {e.lineno})") from None
    for kind, word in _REFUSED.items():
        if next(tree.find_all(kind), None) is not None:
            raise RecipeError(f"{where}: {{% {word} %}} is not allowed: a recipe template sees the recipe's "
                              "variables only, never another file")
    try:
        return _SANDBOX.from_string(tree).render(**variables)
    except jinja2.TemplateError as e:
        raise RecipeError(f"{where}: template error: {e}") from None
    except (ArithmeticError, TypeError, ValueError, LookupError) as e:
        raise RecipeError(f"{where}: template error: {type(e).__name__}: {e}") from None
