"""What quantization did, as a table (logged by the hook) and as ``quantization_report.json``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..plan import Site, account
from .base import Bits


@dataclass
class QuantReport:
    """What quantization did: per-site bits and granularity, totals, calibration, float leftovers.

    ``str(report)`` is the table the hook logs; :meth:`to_dict` is ``quantization_report.json``.
    """

    config: dict
    sites: list[Site]
    bits: dict[str, Bits]
    granularity: dict[str, str]
    reparameterized: dict[str, str] = field(default_factory=dict)
    float_modules: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    input_shape: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. a placeholder plan: shown in the table and JSON

    @property
    def totals(self) -> dict:
        acc = account(self.sites, self.bits)
        n_layers = sum(s.kind != 'matmul' for s in self.sites)
        return {
            'conv_linear': n_layers,
            'matmul': len(self.sites) - n_layers,
            **acc.to_dict(),
            'float_modules': len(self.float_modules),
            'float_params': sum(m['params'] for m in self.float_modules),
        }

    @property
    def calibration_ids(self) -> list:
        return list(self.calibration.get('image_ids') or [])

    def table(self) -> str:
        rows = [('site', 'kind', 'W', 'A', 'granularity', 'reparam')]
        for s in self.sites:
            w, a = self.bits[s.name]
            rows.append(
                (
                    s.name,
                    s.kind,
                    '-' if s.kind == 'matmul' else str(w),
                    str(a),
                    self.granularity[s.name],
                    self.reparameterized.get(s.name, '-'),
                )
            )
        for m in self.float_modules:
            rows.append((m['name'], m['family'], 'float', 'float', f'not quantized: {m["reason"]}', '-'))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ['  '.join(c.ljust(wd) for c, wd in zip(row, widths)) for row in rows]
        lines.insert(1, '  '.join('-' * wd for wd in widths))
        lines[:0] = [f'WARNING: {w}' for w in self.warnings]
        t = self.totals
        c = self.config
        shape = f' at {self.input_shape[1]}x{self.input_shape[0]}' if self.input_shape else ''
        method = c['method'] + (f'(k={c["crl_k"]})' if c['method'] == 'crl' else '')
        rec = self.calibration.get('reconstruction')
        reconstructed = (
            f'; reconstructed {rec["blocks"]} blocks + {rec["heads"]} heads + {rec["layers"]} layers on '
            f'{rec["images"]:g} image(s) in {rec["seconds"]:.0f} s'
            if rec
            else ''
        )
        leftover = (
            f'; {t["float_modules"]} module(s) left in float ({t["float_params"]} weights, not in these totals)'
            if self.float_modules
            else ''
        )
        cal = self.calibration
        calib = (
            f'calibration: {cal.get("num_images")} image(s) {self.calibration_ids}, '
            f'batch size {cal.get("batch_size")}, rule: {cal.get("rule")}'
            if cal
            else 'not calibrated'
        )
        lines.append(
            f'scope={c["scope"]} method={method}: {t["conv_linear"]} Conv2d/Linear + {t["matmul"]} attention '
            f'matmuls quantized; avg W bits {t["avg_weight_bits"]:.3f}, avg A bits {t["avg_act_bits"]:.3f} '
            f'(MAC-weighted {t["avg_act_bits_mac_weighted"]:.3f}), weights {t["weight_mb"]:.2f} MB, '
            f'{t["bops"] / 1e9:.2f} GBOPs/image{shape}{leftover}; {calib}{reconstructed}'
        )
        return '\n'.join(lines)

    __str__ = table

    def to_dict(self) -> dict:
        return {
            'settings': self.config,
            'totals': self.totals,
            'calibration_ids': self.calibration_ids,
            'calibration': self.calibration,
            'input_shape': self.input_shape,
            'float_modules': self.float_modules,
            'warnings': list(self.warnings),
            'sites': [
                {
                    **s.to_dict(),
                    'w_bits': self.bits[s.name][0],
                    'a_bits': self.bits[s.name][1],
                    'granularity': self.granularity[s.name],
                    'reparam': self.reparameterized.get(s.name),
                }
                for s in self.sites
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantReport:
        sites = [
            Site(**{k: s[k] for k in ('name', 'kind', 'layer_type', 'block', 'stage', 'params', 'macs')})
            for s in data['sites']
        ]
        return cls(
            config=data['settings'],
            sites=sites,
            bits={s['name']: (s['w_bits'], s['a_bits']) for s in data['sites']},
            granularity={s['name']: s['granularity'] for s in data['sites']},
            reparameterized={s['name']: s['reparam'] for s in data['sites'] if s['reparam']},
            float_modules=list(data.get('float_modules', [])),
            calibration=dict(data.get('calibration', {})),
            warnings=list(data.get('warnings', [])),
            input_shape=tuple(data['input_shape']) if data.get('input_shape') else None,
        )


def sites_with_macs(sites: list[Site], counts: dict[str, int], n_images: float) -> list[Site]:
    """``sites`` with their MACs per image, from :func:`count_macs` totals over ``n_images`` images."""
    return [replace(s, macs=round(counts.get(s.name, 0) / max(1.0, n_images))) for s in sites]


__all__ = ['QuantReport', 'sites_with_macs']
