"""What the maths tools compute; runs inside a limited worker process (see maths.py, limits.py).

`run_tool(tool, args, variables, protocol)` takes only JSON-able input (the action's
argument text and the text of the variables it names) and returns text or a list of text,
or raises a ToolError. Formulas are read by `maths_parse` (no `eval`); `protocol` is
'robust' or 'reference' (the differences are listed in maths.py's docstring).
"""

from __future__ import annotations

import re

import sympy

from lumos_jax.agent.tools.base import BadArguments, ToolError, UndefinedVariable, VARIABLE_RE
from lumos_jax.agent.tools.maths_parse import parse_math, parse_system

MAX_VALUE = 5_000  # characters of a result or a Define/SetEquation value
PROTOCOLS = ("robust", "reference")
_NUMBER_IN_TEXT = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_REF_OPS = ("*", "/", "+", "-", "^")  # the reference's MATH_OP (gsm/utils.py:8)
_ATOMIC = re.compile(r"\s*(?:\d+(?:\.\d+)?|[A-Za-z])\s*")
_EQUATION = re.compile(r"(?<![<>!=])=(?!=)")


class _Ctx:
    def __init__(self, variables: dict[str, str], protocol: str):
        if protocol not in PROTOCOLS:
            raise BadArguments(f"unknown maths protocol {protocol!r} (expected one of {PROTOCOLS})")
        self.variables, self.protocol = variables, protocol
        self.reference = protocol == "reference"

    def value(self, name: str) -> str:
        if name not in self.variables:
            raise UndefinedVariable(f"undefined variable {name}")
        return self.variables[name]

    def parse(self, text: str):
        return parse_math(text, split_names=self.reference)

    def system(self, text: str) -> list:
        return parse_system(text, split_names=self.reference)


def _bounded(text: str, what: str) -> str:
    if len(text) > MAX_VALUE:
        raise BadArguments(f"{what} would be {len(text)} characters (limit {MAX_VALUE})")
    return text


def _replace(args: str, ctx: _Ctx, wrap) -> str:
    """`args` with each R<n> replaced by wrap(value), its length checked before it is built."""
    names = VARIABLE_RE.findall(args)
    size = len(args) + sum(len(ctx.value(n)) + 4 for n in names)
    if size > 4 * MAX_VALUE:
        raise BadArguments(f"substituting the variables would make {size} characters (limit {4 * MAX_VALUE})")
    return VARIABLE_RE.sub(lambda m: wrap(ctx.value(m.group(0))), args)


def decimal_mode(text: str) -> bool:
    return bool(re.search(r"\d\.\d|(?<![\d])\.\d|%", text))


def format_value(value, decimal: bool = False, expand: bool = False) -> str:
    """A result as the reference's data writes it: `2p/5`, `(p + 600)/4`, `0.75`, `3/5`."""
    if isinstance(value, bool) or value in (sympy.true, sympy.false):
        return "True" if bool(value) else "False"
    if isinstance(value, int):
        value = sympy.Integer(value)
    if isinstance(value, sympy.Equality):
        return f"{format_value(value.lhs, decimal, expand)} = {format_value(value.rhs, decimal, expand)}"
    if value.is_Relational:
        return _pretty(str(value))
    if value.is_number:
        if value.is_real is False and value.is_complex:
            return _pretty(str(sympy.nsimplify(value)))
        v = sympy.nsimplify(value) if isinstance(value, sympy.Float) else value
        if v.is_Integer:
            if abs(int(v)).bit_length() > 3.33 * MAX_VALUE:
                raise BadArguments(f"result has more than {MAX_VALUE} digits")
            return str(int(v))
        if v.is_Rational and not decimal:
            return f"{v.p}/{v.q}"
        try:
            f = float(v)
        except (TypeError, OverflowError, ValueError):
            return _pretty(str(v))
        if f != f or f in (float("inf"), float("-inf")):
            return _pretty(str(v))
        if f == int(f) and abs(f) < 1e15:
            return str(int(f))
        return f"{f:.10g}" if "e" not in f"{f:.10g}" else repr(f)
    if expand:  # WolframAlpha's `Expand x`, over one denominator: n^2 - 4n + 4, (p + 600)/4
        return _pretty(str(sympy.together(sympy.expand(value))))
    return _pretty(str(sympy.together(value)))


def _pretty(s: str) -> str:
    s = s.replace("**", "^")
    return re.sub(r"(\d)\*(?=[A-Za-z(])", r"\1", s)


def _as_math_text(text: str, ctx: _Ctx) -> str:
    """A variable's value as formula text: numbers are pulled out of prose answers."""
    if ctx.reference:
        return text  # the reference substitutes `str(value)` (gsm:24,31,33)
    text = text.strip().rstrip(".").strip()
    try:
        ctx.parse(text)
        return text
    except ToolError:
        pass
    nums = _NUMBER_IN_TEXT.findall(text)
    if nums:
        return nums[0].replace(",", "")
    low = text.lower()
    if low in ("true", "yes"):
        return "True"
    if low in ("false", "no"):
        return "False"
    raise BadArguments(f"value {text[:60]!r} is not a number or formula")


def substitute(args: str, ctx: _Ctx) -> str:
    """The reference's rule (gsm:19-35): plain replacement when the arguments hold `R<n>(`
    or no operator, else each variable as `(value)` (`:(value):` for an equation, which the
    Calculator then combines side by side). Robust: a lone variable is replaced plainly,
    a number or one-letter value needs no parentheses, anything else gets them."""
    if not VARIABLE_RE.search(args):
        return args
    if ctx.reference:
        if re.search(r"R\d+\(", args) or not any(op in args for op in _REF_OPS):
            return _replace(args, ctx, str)
        return _replace(args, ctx, lambda v: f":({v}):" if "=" in v else f"({v})")
    if re.fullmatch(r"\s*R\d+\s*", args):
        return _as_math_text(ctx.value(args.strip()), ctx)

    def wrap(v: str) -> str:
        t = _as_math_text(v, ctx)
        return t if _ATOMIC.fullmatch(t) else f"({t})"
    return _replace(args, ctx, wrap)


def _apply_function_call(args: str, ctx: _Ctx):
    """`R1(R2)` / `R1(a=1, b=2)`: R1's formula with the given values substituted (the
    reference asks WolframAlpha `R1's value, where R2's value`, math_tool.py:11-13)."""
    m = re.fullmatch(r"\s*(R\d+)\s*\((.*)\)\s*", args, re.S)
    if not m:
        return None
    base = ctx.parse(_as_math_text(ctx.value(m.group(1)), ctx))
    inner = _replace(m.group(2), ctx, lambda v: v.strip().rstrip("."))
    subs, plain = {}, []
    for p in (p for p in re.split(r",|\band\b", inner) if p.strip()):
        if "=" in p:
            k, v = p.split("=", 1)
            if not re.fullmatch(r"\s*[A-Za-z][A-Za-z0-9_]*\s*", k):
                raise BadArguments(f"cannot substitute into {k.strip()[:30]!r}: not a name")
            subs[sympy.Symbol(k.strip())] = ctx.parse(v)
        else:
            plain.append(ctx.parse(p))
    free = sorted(base.free_symbols, key=lambda s: s.name)
    for sym, val in zip([s for s in free if s not in subs], plain):
        subs[sym] = val
    if not subs:
        raise BadArguments(f"nothing to substitute in {args[:60]!r}")
    out = base.subs(subs)
    return sympy.simplify(out) if not isinstance(out, sympy.Equality) else out


def evaluate(formula: str, ctx: _Ctx):
    """A formula's value, an equation with its sides simplified, or a comparison's truth."""
    e = ctx.parse(formula)
    if isinstance(e, sympy.Equality):
        return sympy.Eq(sympy.simplify(e.lhs), sympy.simplify(e.rhs), evaluate=False)
    if e.is_Relational or e in (sympy.true, sympy.false):
        return e
    return sympy.simplify(e) if e.free_symbols else sympy.nsimplify(e) if isinstance(e, sympy.Float) else e


def _combine_equations(args: str, ctx: _Ctx):
    """`R1 + R2` where the values are equations: the formula applied to each side
    (the reference's combine_eqs, gsm/utils.py:54-70)."""
    vals = {n: ctx.value(n) for n in VARIABLE_RE.findall(args)}
    if not any(_EQUATION.search(v) and not re.search(r"[<>!]=|==", v) for v in vals.values()):
        return None
    sides = []
    for side in (0, 1):
        def repl(m, side=side):
            v = vals[m.group(0)].strip().rstrip(".")
            return f"({v.split('=', 1)[side] if '=' in v else v})"
        sides.append(VARIABLE_RE.sub(repl, args))
    return sympy.Eq(sympy.simplify(ctx.parse(sides[0])), sympy.simplify(ctx.parse(sides[1])), evaluate=False)


def calculator(args: str, ctx: _Ctx):
    expand = ctx.reference
    func = _apply_function_call(args, ctx)
    if func is not None:
        text = _replace(args, ctx, str)
        return format_value(func, decimal_mode(args) or decimal_mode(text), expand)
    combined = _combine_equations(args, ctx)
    if combined is not None:
        return format_value(combined, expand=expand)
    formula = substitute(args, ctx)
    if ctx.reference and formula.isdigit():  # returned as is (math_tool.py:17-18)
        return formula
    return format_value(evaluate(formula, ctx), decimal_mode(formula), expand)


def set_equation(args: str, ctx: _Ctx):
    """The equation itself, variables substituted as in every maths tool (with parentheses;
    the reference returns its text unread, math_tool.py:33-37)."""
    text = _bounded(substitute(args, ctx), "the equation")
    if not ctx.reference:
        ctx.system(text)  # robust: refuse what SolveEquation could not read
        return text.strip()
    if "," in text and all(_EQUATION.search(p) for p in text.split(",")[1:]):
        # `eq, x = 2`: the reference asks WolframAlpha `eq, where x = 2`
        first, rest = text.split(",", 1)
        base = ctx.parse(first)
        subs = {}
        for p in rest.split(","):
            k, v = p.split("=", 1)
            if re.fullmatch(r"\s*[A-Za-z][A-Za-z0-9_]*\s*", k):
                subs[sympy.Symbol(k.strip())] = ctx.parse(v)
        if subs:
            return format_value(base.subs(subs), decimal_mode(text), expand=True)
    return text


def solve_equation(args: str, ctx: _Ctx):
    """One unknown -> its value; several -> one value per unknown (sorted by name). An
    expression without '=' is evaluated (`SolveEquation(R2 + R4)` in the data). Reference
    form (gsm:43-51): each value is the text after `=` of WolframAlpha's `x = v ∧ y = w`,
    unstripped (` 1000`); a `±` pair keeps the ` + a` root."""
    text = substitute(args, ctx)
    if ctx.reference and ":(" in text:
        text = text.replace(":(", "(").replace("):", ")")
    eqs = ctx.system(text)
    decimal = decimal_mode(text)
    if len(eqs) == 1 and not isinstance(eqs[0], sympy.Equality):
        e = eqs[0]
        if not getattr(e, "free_symbols", None):
            return format_value(evaluate(text, ctx), decimal)
        eqs = [sympy.Eq(e, 0)]
    eqs = [e if isinstance(e, sympy.Equality) else sympy.Eq(e, 0) for e in eqs]
    unknowns = sorted(set().union(*(e.free_symbols for e in eqs)), key=lambda s: s.name)
    if not unknowns:
        raise BadArguments(f"no unknowns in {text[:60]!r}")
    sol = sympy.solve(eqs, unknowns, dict=True)
    if not sol:
        raise ToolError(f"no solution for {text[:80]!r}")
    if len(unknowns) == 1 and len(sol) > 1:
        roots = [s[unknowns[0]] for s in sol if unknowns[0] in s]
        if ctx.reference:
            return " " + _plus_root(roots, decimal)
        return ", ".join(format_value(r, decimal) for r in roots)  # every root: "-a, a"
    first = sol[0]
    values = [format_value(first[u], decimal, ctx.reference) if u in first else u.name for u in unknowns]
    if ctx.reference:
        values = [" " + v for v in values]
    return values[0] if len(values) == 1 else values


def _plus_root(roots: list, decimal: bool) -> str:
    """`x = c ± d` -> `c + d` (gsm:44-46 keeps `terms[0] + terms[1]`); `± a` -> `+ a`."""
    if len(roots) != 2:
        raise ToolError(f"{len(roots)} solutions; WolframAlpha lists them separately, which the "
                        "reference's SolveEquation cannot store (gsm:43-51)")
    c = sympy.simplify((roots[0] + roots[1]) / 2)
    d = sympy.simplify(abs(roots[1] - roots[0]) / 2) if all(r.is_real for r in roots) else \
        sympy.simplify((roots[1] - roots[0]) / 2)
    if c == 0:
        return f"+ {format_value(d, decimal)}"
    if d.is_Rational:
        raise ToolError(f"two solutions {format_value(roots[0], decimal)}, {format_value(roots[1], decimal)}; "
                        "WolframAlpha lists rational roots separately, which the reference's "
                        "SolveEquation cannot store (gsm:43-51)")
    return f"{format_value(c, decimal)} + {format_value(d, decimal)}"


def solve_inequality(args: str, ctx: _Ctx) -> str:
    text = substitute(args, ctx)
    rel = ctx.parse(text)
    if not (isinstance(rel, sympy.Basic) and rel.is_Relational) or isinstance(rel, sympy.Equality):
        raise BadArguments(f"not an inequality: {text[:60]!r}")
    syms = sorted(rel.free_symbols, key=lambda s: s.name)
    if len(syms) != 1:
        raise BadArguments(f"an inequality needs exactly one unknown, got {len(syms)}")
    solved = sympy.solve_univariate_inequality(rel, syms[0], relational=False)
    return _format_set(solved, syms[0].name, decimal_mode(text))


def _format_set(s, x: str, decimal: bool) -> str:
    """An interval set as WolframAlpha writes it: `x > 2`, `2 < x <= 5`, `... or ...`."""
    if isinstance(s, sympy.Union):
        return " or ".join(_format_set(a, x, decimal) for a in s.args)
    if s == sympy.S.Reals:
        return "all real x"
    if s is sympy.S.EmptySet:
        return "no solution"
    if isinstance(s, sympy.FiniteSet):
        return ", ".join(f"{x} = {format_value(v, decimal)}" for v in s)
    if isinstance(s, sympy.Interval):
        lo, hi = s.start, s.end
        if lo == -sympy.oo:
            return f"{x} {'<' if s.right_open else '<='} {format_value(hi, decimal)}"
        if hi == sympy.oo:
            return f"{x} {'>' if s.left_open else '>='} {format_value(lo, decimal)}"
        return (f"{format_value(lo, decimal)} {'<' if s.left_open else '<='} {x} "
                f"{'<' if s.right_open else '<='} {format_value(hi, decimal)}")
    return _pretty(str(s))


def define(args: str, ctx: _Ctx) -> str:
    text = _bounded(substitute(args, ctx), "the defined value")
    if not text.strip():
        raise BadArguments("Define needs a variable or a number")
    return text if ctx.reference else text.strip()


def count(args: str, ctx: _Ctx) -> str:
    text = _replace(args, ctx, str).strip()
    if len(text) >= 2 and text[0] + text[-1] in ("[]", "{}", "()"):  # one enclosing pair: [1, 2, 3]
        text = text[1:-1]
    items = [i.strip() for i in text.split(",") if i.strip()]
    if "..." in items:  # an arithmetic sequence a, b, ..., z
        if len(items) < 4 or items.index("...") != len(items) - 2:
            raise BadArguments("a sequence with '...' needs 'a, b, ..., z'")
        a, b, z = (ctx.parse(items[0]), ctx.parse(items[1]), ctx.parse(items[-1]))
        if b == a:
            raise BadArguments("a sequence with '...' needs two different first terms")
        return format_value(sympy.simplify((z - a) / (b - a) + 1))
    return str(len(items))


TOOLS = {"Calculator": calculator, "SetEquation": set_equation, "SolveEquation": solve_equation,
         "SolveInequality": solve_inequality, "Define": define, "Count": count}


def run_tool(tool: str, args: str, variables: dict, protocol: str = "robust"):
    """Entry point of the worker: one maths tool call on JSON-able input."""
    if tool not in TOOLS:
        raise BadArguments(f"unknown maths tool {tool!r}")
    if not isinstance(args, str) or not all(isinstance(v, str) for v in variables.values()):
        raise BadArguments("maths tools take text arguments and text variable values")
    value = TOOLS[tool](args, _Ctx(dict(variables), protocol))
    for v in value if isinstance(value, list) else [value]:
        _bounded(v, "the result")
    return value


def warm_up() -> None:
    """Run each code path once before the worker forks, so children start with sympy's
    lazy imports done (a child may not open files and should start in milliseconds)."""
    for tool, args, variables in (("Calculator", "2x + 3x", {}), ("Calculator", "R1 * 2", {"R1": "1.5"}),
                                  ("SolveEquation", "x + y = 10, x - y = 2", {}),
                                  ("SolveEquation", "x^2 = 2", {}), ("SolveInequality", "2x + 3 > 7", {}),
                                  ("Calculator", "R1(R2)", {"R1": "x^2 + 1", "R2": "x = 3"}),
                                  ("Calculator", "(x+1)^2 / 4 + sqrt(2) + sin(1)", {})):
        for protocol in PROTOCOLS:
            try:
                run_tool(tool, args, variables, protocol)
            except ToolError:
                pass
