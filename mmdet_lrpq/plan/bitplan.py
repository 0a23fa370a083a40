"""A bit plan is data: an ordered map from site names (or ``re:`` patterns) to ``(w_bits, a_bits)``.

The shape is torchao's ordered name/regex -> config map: exact names win, otherwise the first
``re:`` pattern (full match, in file order) decides, so a plan can say "these layers at 5 bits,
everything else at 4" in two lines. The file also carries what produced it (scores, allocator,
budget with its accounting, source, command) so a number in a table can always be traced back,
and, for plans computed on a model, that model's ``architecture`` (e.g. a Swin's embedding width,
depths and heads), so a plan made for one backbone is refused on another instead of silently
sending the sites it does not name to its catch-all.

A plan that cannot mean what it says is an error: duplicate keys in the JSON file (the last one
would silently win), patterns after the catch-all ``re:.*`` (never consulted), and, on a model,
patterns whose every site an earlier pattern already decides.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..bits import Bits, check_bit_pair
from .sites import Site

PLAN_FORMAT = 'mmdet-lrpq/bitplan@1'
PATTERN_PREFIX = 're:'
CATCH_ALL = 're:.*'
_FIELDS = ('format', 'allocator', 'command', 'source', 'architecture', 'budget', 'bits', 'scores')


def format_names(names: Iterable[str], limit: int = 10) -> str:
    """``'a', 'b', ... (N in all)``: error messages list names in full up to ``limit``."""
    names = list(names)
    shown = ', '.join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f'{shown}, ... ({len(names)} in all)'


def check_scores(scores: Mapping[str, Any]) -> dict[str, float]:
    """``scores`` as ``{name: float}``; NaN/inf or non-numbers are rejected (they cannot rank sites)."""
    bad = [
        f'{k}={v!r}'
        for k, v in scores.items()
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
    ]
    if bad:
        raise ValueError(f'scores must be finite numbers; got {format_names(bad)}')
    return {str(k): float(v) for k, v in scores.items()}


def _site_names(sites: Iterable[Site | str]) -> list[str]:
    return [s.name if isinstance(s, Site) else s for s in sites]


class BitPlan:
    """Ordered ``site name | re:pattern -> (w_bits, a_bits)`` with the provenance of the plan.

    ``bits`` is exposed read-only; assign a new mapping to change it (it is re-checked).
    """

    def __init__(
        self,
        bits: Mapping[str, Any] | None = None,
        *,
        scores: Mapping[str, float] | None = None,
        allocator: str = '',
        budget: dict | None = None,
        source: dict | None = None,
        command: str = '',
        architecture: Mapping[str, Any] | None = None,
    ):
        self.bits = bits or {}
        self.scores = scores or {}
        self.allocator = allocator
        self.budget = dict(budget or {})
        self.source = dict(source or {})
        self.command = command
        self.architecture = None if architecture is None else dict(architecture)

    @property
    def scores(self) -> Mapping[str, float]:
        """Site -> relative importance that produced the plan (may be empty); read-only like ``bits``."""
        return MappingProxyType(self._scores)

    @scores.setter
    def scores(self, scores: Mapping[str, float]) -> None:
        self._scores = check_scores(scores)

    # ------------------------------------------------------------------ bits
    @property
    def bits(self) -> Mapping[str, Bits]:
        return self._bits_view

    @bits.setter
    def bits(self, bits: Mapping[str, Any]) -> None:
        checked: dict[str, Bits] = {}
        patterns: list[tuple[str, re.Pattern]] = []
        for key, value in bits.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f'bit plan keys must be non-empty strings, got {key!r}')
            checked[key] = check_bit_pair(key, value)
            if key.startswith(PATTERN_PREFIX):
                try:
                    patterns.append((key, re.compile(key[len(PATTERN_PREFIX) :])))
                except re.error as e:
                    raise ValueError(f'bit plan entry {key!r}: invalid regular expression ({e})') from None
        pattern_keys = [k for k, _ in patterns]
        after_catch_all = pattern_keys[pattern_keys.index(CATCH_ALL) + 1 :] if CATCH_ALL in pattern_keys else []
        if after_catch_all:
            raise ValueError(
                f'bit plan entries after the catch-all {CATCH_ALL!r} are never used (patterns are '
                f'tried in order): {format_names(after_catch_all)}. Move them before {CATCH_ALL!r}.'
            )
        self._bits = checked
        self._bits_view = MappingProxyType(checked)
        self._patterns = patterns

    @classmethod
    def uniform(cls, w_bits: int, a_bits: int) -> BitPlan:
        """Every site at ``(w_bits, a_bits)``: the plan behind plain WxAy configs."""
        return cls({CATCH_ALL: (w_bits, a_bits)}, allocator='uniform')

    def _match(self, name: str) -> str | None:
        """The key that decides ``name``: exact key first, else the first fully matching pattern."""
        if name in self._bits:
            return name
        return next((key for key, pat in self._patterns if pat.fullmatch(name)), None)

    def resolve(self, site_names: Iterable[Site | str]) -> dict[str, Bits]:
        """``{site: (w_bits, a_bits)}`` for every given site; a site no entry covers is an error."""
        names = _site_names(site_names)
        keys = {n: self._match(n) for n in names}
        unmatched = [n for n, k in keys.items() if k is None]
        if unmatched:
            raise ValueError(
                f'the bit plan covers no entry for {len(unmatched)} site(s): '
                f'{format_names(unmatched)}. Add entries for them, or a fallback with '
                f'BitPlan.with_default(w_bits, a_bits).'
            )
        return {n: self._bits[k] for n, k in keys.items() if k is not None}

    def validate(self, sites: Iterable[Site | str]) -> None:
        """Check the plan against a model's sites; raise one ValueError listing every mismatch.

        A pattern is *used* when it decides a site. A pattern whose matching sites all have exact
        keys is a fallback this model does not need (a catch-all with every site named), which is
        fine; one whose sites an earlier pattern decides can never take effect here: an error.
        """
        names = _site_names(sites)
        known = set(names)
        problems = []
        unknown = [k for k in self._bits if not k.startswith(PATTERN_PREFIX) and k not in known]
        if unknown:
            problems.append(
                f'{len(unknown)} exact key(s) name no site of this model: {format_names(unknown)}. '
                f'Is the plan for another model or naming scheme? Map its names with '
                f'BitPlan.rename (e.g. timm -> mmdet) or remove these entries.'
            )
        deciding = {n: self._match(n) for n in names}
        matched = {k: [n for n in names if pat.fullmatch(n)] for k, pat in self._patterns}
        unused = [k for k, hits in matched.items() if not hits]
        if unused:
            problems.append(
                f'{len(unused)} pattern(s) match no site: {format_names(unused)}. '
                f'Patterns must match a whole site name; fix or remove them.'
            )
        shadowed = [
            f'{k} (by {format_names(sorted({str(deciding[n]) for n in hits if deciding[n] != n}), 3)})'
            for k, hits in matched.items()
            if hits and k not in deciding.values() and any(deciding[n] != n for n in hits)
        ]
        if shadowed:
            problems.append(
                f'{len(shadowed)} pattern(s) decide no site because an earlier pattern decides every '
                f'site they match: {", ".join(shadowed)}. Move them before that pattern or remove them.'
            )
        uncovered = [n for n in names if deciding[n] is None]
        if uncovered:
            problems.append(
                f'{len(uncovered)} site(s) are matched by no entry: {format_names(uncovered)}. '
                f'Add entries for them, or a fallback with BitPlan.with_default(w_bits, a_bits).'
            )
        if problems:
            raise ValueError('bit plan does not fit this model:\n- ' + '\n- '.join(problems))

    def check_architecture(self, architecture: Mapping[str, Any], where: str = 'this model') -> None:
        """Refuse the plan on a backbone other than the one it was computed for.

        Compares the fields both sides record (a hand-written plan records none and always passes):
        a Swin-T plan on a Swin-S names the first six stage-3 blocks exactly and would send the
        other twelve to its catch-all without a word.
        """
        if not self.architecture:
            return
        differ = {
            k: (self.architecture[k], architecture[k])
            for k in self.architecture
            if k in architecture and _canonical(self.architecture[k]) != _canonical(architecture[k])
        }
        if differ:
            detail = ', '.join(f'{k}: plan {a!r} vs model {b!r}' for k, (a, b) in differ.items())
            raise ValueError(
                f'the bit plan was made for another architecture than {where} ({detail}). '
                f'Make a plan for this backbone with tools/lrp_plan.py (its --model must be the '
                f'classifier of the same size).'
            )

    def placeholder_reason(self) -> str | None:
        """Why the plan's ranking of layers means nothing (it was made from random weights), else ``None``."""
        weights = self.source.get('weights')
        if isinstance(weights, Mapping) and weights.get('kind') == 'random-init':
            return (
                f'it was computed from randomly initialised classifier weights (source.weights.kind = '
                f"'random-init', seed {weights.get('seed')!r})"
            )
        return None

    # ------------------------------------------------------------------ derived plans
    def rename(self, fn: Callable[[str], str | None]) -> BitPlan:
        """A copy with every exact key and score key mapped through ``fn`` (``None`` drops it).

        Patterns are kept as they are: they are written for the target naming already.
        """

        def mapped(items: Iterable[tuple[str, Any]], what: str, is_pattern: Callable[[str], bool]) -> dict:
            out: dict[str, Any] = {}
            origin: dict[str, str] = {}
            for key, value in items:
                new = key if is_pattern(key) else fn(key)
                if new is None:
                    continue
                if new in out:
                    raise ValueError(f'rename maps {what} {origin[new]!r} and {key!r} both to {new!r}')
                out[new], origin[new] = value, key
            return out

        return self._replace(
            bits=mapped(self._bits.items(), 'bit plan keys', lambda k: k.startswith(PATTERN_PREFIX)),
            scores=mapped(self.scores.items(), 'score keys', lambda k: False),
        )

    def with_default(self, w_bits: int, a_bits: int) -> BitPlan:
        """A copy whose last entry is the catch-all ``re:.*`` (replacing any earlier catch-all).

        Gives a backbone-only plan its bits for the rest of a detector (neck, heads). Adding sites
        at uniform ``k`` never breaks a ``Budget(weight_bits=k)`` that held without them.
        """
        return self._replace(
            bits={**{k: v for k, v in self._bits.items() if k != CATCH_ALL}, CATCH_ALL: (w_bits, a_bits)}
        )

    def _replace(self, **changes: Any) -> BitPlan:
        fields = dict(
            bits=self._bits,
            scores=self.scores,
            allocator=self.allocator,
            budget=copy.deepcopy(self.budget),
            source=copy.deepcopy(self.source),
            command=self.command,
            architecture=copy.deepcopy(self.architecture),
        )
        return BitPlan(**{**fields, **changes})

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return {
            'format': PLAN_FORMAT,
            'allocator': self.allocator,
            'command': self.command,
            'source': copy.deepcopy(self.source),
            'architecture': copy.deepcopy(self.architecture),
            'budget': copy.deepcopy(self.budget),
            'bits': {k: list(v) for k, v in self._bits.items()},
            'scores': dict(self.scores),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = 'bit plan') -> BitPlan:
        if not isinstance(data, Mapping) or data.get('format') != PLAN_FORMAT:
            found = data.get('format') if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f'{where} is not an mmdet-lrpq bit plan: format is {found!r}, expected '
                f'{PLAN_FORMAT!r}. Make plans with tools/lrp_plan.py or BitPlan.save.'
            )
        extra = sorted(set(data) - set(_FIELDS))
        if extra:
            raise ValueError(
                f'{where}: unknown field(s) {format_names(extra)}; a {PLAN_FORMAT} plan has {format_names(_FIELDS)}'
            )
        return cls(
            data.get('bits', {}),
            scores=data.get('scores'),
            allocator=data.get('allocator', ''),
            budget=data.get('budget'),
            source=data.get('source'),
            command=data.get('command', ''),
            architecture=data.get('architecture'),
        )

    def save(self, path: str | Path) -> None:
        """Write human-readable JSON (indent 2, one ``"site": [w, a]`` per line)."""
        text = json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False)
        text = re.sub(r'\[\s+(-?\d+),\s+(-?\d+)\s+\]', r'[\1, \2]', text)
        Path(path).write_text(text + '\n')

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        try:
            text = Path(path).read_text(encoding='utf-8')
        except FileNotFoundError:
            raise FileNotFoundError(f'bit plan not found: {path}') from None
        except UnicodeDecodeError as e:
            raise ValueError(f'{path}: not a text (JSON) file ({e}); is it a bit plan?') from None
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise ValueError(
                f'{path}: not valid JSON ({e}); a truncated or hand-edited plan? Regenerate it with '
                f'the command recorded in it, or tools/lrp_plan.py'
            ) from None
        except _DuplicateKeys as e:
            raise ValueError(
                f'{path}: duplicate JSON key(s) {format_names(e.keys)} (only the last of each would '
                f'count); keep one entry per key'
            ) from None
        return cls.from_dict(data, where=str(path))

    def content_hash(self) -> str:
        """sha256 of what the plan says (bits, scores, provenance), independent of file formatting."""
        text = json.dumps(json_safe(self.to_dict()), sort_keys=True, separators=(',', ':'), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitPlan):
            return NotImplemented
        return list(self._bits.items()) == list(other._bits.items()) and json_safe(self.to_dict()) == json_safe(
            other.to_dict()
        )

    def __repr__(self) -> str:
        return f'BitPlan({len(self._bits)} entries, allocator={self.allocator!r})'


class _DuplicateKeys(ValueError):
    def __init__(self, keys: list[str]):
        super().__init__(keys)
        self.keys = keys


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    counts: dict[str, int] = {}
    for key, _ in pairs:
        counts[key] = counts.get(key, 0) + 1
    repeated = [k for k, c in counts.items() if c > 1]
    if repeated:
        raise _DuplicateKeys(repeated)
    return dict(pairs)


def _canonical(value: Any) -> Any:
    """Architecture fields compare by value: tuples and lists alike, 4 and 4.0 alike."""
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def json_safe(value: Any) -> Any:
    """Non-finite floats (e.g. a MAC-weighted average with no MACs known) become ``null`` in JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
