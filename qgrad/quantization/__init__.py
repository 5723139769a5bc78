"""Post-training quantization (BatchNorm folding, activation ranges, :func:`quantize_model`), quantization-aware
fine-tuning (:func:`prepare_qat`) and bit-width sweeps (:func:`sweep`)."""
from qgrad.quantization.fold import fold_bn, fold_bn_pair
from qgrad.quantization.ptq import ACT_RANGES, quantize_model
from qgrad.quantization.qat import prepare_qat
from qgrad.quantization.ranges import Interval, bn_input_ranges, calibration_ranges, propagate_intervals
from qgrad.quantization.sweep import DEFAULT_CONFIGS, format_table, sweep

__all__ = [
    "ACT_RANGES",
    "DEFAULT_CONFIGS",
    "Interval",
    "bn_input_ranges",
    "calibration_ranges",
    "fold_bn",
    "fold_bn_pair",
    "format_table",
    "prepare_qat",
    "propagate_intervals",
    "quantize_model",
    "sweep",
]
