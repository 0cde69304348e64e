"""Analysis of trained runs: spectra of weight updates (paper Figure 3)."""

from .spectrum import ModuleSpectrum, SpectrumReport, module_spectrum, plot_spectra, update_spectrum

__all__ = ["ModuleSpectrum", "SpectrumReport", "module_spectrum", "plot_spectra", "update_spectrum"]
