"""Spectral analysis of weight updates (paper Figure 3).

For each adapted 2-D weight W (base) and W' (trained, merged), with dW = W' - W and W = U S V^T:

- `alignment[i] = |u_i^T dW v_i|`, normalised to sum 1: how much of the update acts along W's i-th
  singular direction pair. A PiSSA-style update concentrates at small i (principal), a MiLoRA-style
  one at large i (minor), a dense random update spreads evenly (Figure 3, left).
- `energy[k] = sum_{j<=k} s_j(dW)^2 / ||dW||_F^2`: cumulative energy of dW's own spectrum
  (Figure 3, centre): how low-rank the update is.

Modules have different sizes, so per-module curves are resampled onto a relative index grid
(0 = largest singular value, 1 = smallest) before averaging. Written here: no library computes
these curves; the SVDs are torch's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

GRID = 50  # points of the relative singular-index grid


@dataclass
class ModuleSpectrum:
    name: str
    shape: tuple[int, int]
    alignment: np.ndarray  # (min(shape),), sums to 1
    energy: np.ndarray  # (min(shape),), cumulative, ends at 1
    update_norm: float

    def top_share(self, fraction: float) -> float:
        """Share of the alignment mass on the top `fraction` of W's singular directions."""
        k = max(1, int(round(fraction * len(self.alignment))))
        return float(self.alignment[:k].sum())


@dataclass
class SpectrumReport:
    modules: list[ModuleSpectrum] = field(default_factory=list)

    def _resampled(self, attr: str, cumulative: bool) -> np.ndarray:
        grid = np.linspace(0.0, 1.0, GRID)
        curves = []
        for m in self.modules:
            y = getattr(m, attr)
            x = np.linspace(0.0, 1.0, len(y))
            if cumulative:
                curves.append(np.interp(grid, x, y))
            else:  # a density: resample the cumulative mass, then difference it
                c = np.concatenate([[0.0], np.cumsum(y)])
                xc = np.linspace(0.0, 1.0, len(c))
                curves.append(np.diff(np.interp(np.linspace(0.0, 1.0, GRID + 1), xc, c)))
        return np.mean(curves, axis=0) if curves else np.zeros(GRID)

    def mean_alignment(self) -> np.ndarray:
        """Mean alignment mass per relative-index bin (GRID bins, sums to 1)."""
        return self._resampled("alignment", cumulative=False)

    def mean_energy(self) -> np.ndarray:
        return self._resampled("energy", cumulative=True)

    def top_share(self, fraction: float = 0.1) -> float:
        return float(np.mean([m.top_share(fraction) for m in self.modules])) if self.modules else 0.0

    def to_dict(self) -> dict:
        return {
            "grid": np.linspace(0.0, 1.0, GRID).tolist(),
            "mean_alignment": self.mean_alignment().tolist(),
            "mean_energy": self.mean_energy().tolist(),
            "top10_share": self.top_share(0.1),
            "bottom10_share": float(np.mean([1.0 - m.top_share(0.9) for m in self.modules])) if self.modules else 0.0,
            "modules": [
                {"name": m.name, "shape": list(m.shape), "update_norm": m.update_norm,
                 "top10_share": m.top_share(0.1), "energy_at_1pct": float(m.energy[max(0, len(m.energy) // 100 - 1)])}
                for m in self.modules
            ],
        }


@torch.no_grad()
def module_spectrum(name: str, base: torch.Tensor, updated: torch.Tensor) -> ModuleSpectrum | None:
    w = base.detach().to(torch.float64)
    dw = updated.detach().to(torch.float64) - w
    norm = float(torch.linalg.matrix_norm(dw))
    if norm == 0.0:
        return None
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    align = (u.T @ dw @ vh.T).diagonal().abs()  # |u_i^T dW v_i|
    total = float(align.sum())
    align = align / total if total > 0 else torch.full_like(align, 1.0 / len(align))
    s = torch.linalg.svdvals(dw) ** 2
    energy = torch.cumsum(s, 0) / s.sum()
    return ModuleSpectrum(name, tuple(w.shape), align.numpy(), energy.numpy(), norm)


def update_spectrum(base: Iterable[tuple[str, torch.Tensor]], updated: Iterable[tuple[str, torch.Tensor]],
                    include: str | None = r"(q|k|v|o|gate|up|down)_proj\.weight$",
                    max_modules: int | None = None) -> SpectrumReport:
    """Spectra of every 2-D weight that changed between two named weight streams (HF names)."""
    pattern = re.compile(include) if include else None
    base_map = dict(base)
    report = SpectrumReport()
    for name, tensor in updated:
        if tensor.dim() != 2 or (pattern and not pattern.search(name)) or name not in base_map:
            continue
        spec = module_spectrum(name, base_map[name], tensor)
        if spec is not None:
            report.modules.append(spec)
            if max_modules and len(report.modules) >= max_modules:
                break
    return report


def plot_spectra(reports: dict[str, SpectrumReport], path: str) -> str:
    """Figure 3 left and centre for several runs: alignment density and cumulative energy."""
    from .plotting import finish, new_figure

    fig, (ax1, ax2) = new_figure(2, (10, 3.8))
    grid = np.linspace(0.0, 1.0, GRID)
    for label, rep in reports.items():
        ax1.plot(grid, rep.mean_alignment() * GRID, label=label)
        ax2.plot(grid, rep.mean_energy(), label=label)
    ax1.set_xlabel("singular index of W (relative; 0 = principal)")
    ax1.set_ylabel("normalised update magnitude (density)")
    ax1.set_title("Update along W's singular directions")
    ax2.set_xlabel("top-k of dW's spectrum (relative k)")
    ax2.set_ylabel("cumulative energy")
    ax2.set_title("Energy of the update's own spectrum")
    return finish(fig, [ax1, ax2], path)
