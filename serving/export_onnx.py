"""Export a BertForMaskedLM directory to ONNX (dynamic batch and length), check it against PyTorch through
onnxruntime, and write a dynamically quantized INT8 copy beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling_bert_te import BertForMaskedLM

log = logging.getLogger("serving.export_onnx")

OUTPUTS = ("logits", "hidden")  # full masked-LM logits [B,S,V], or the last hidden states [B,S,H] (embeddings)
FP32_NAME, INT8_NAME = "model.onnx", "model.int8.onnx"


class ServingWrapper(nn.Module):
    """(input_ids, attention_mask) -> one tensor, the shape ONNX wants: no dataclass, no optional arguments."""

    def __init__(self, model: BertForMaskedLM, output: str) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output {output!r} is unknown; choose one of {OUTPUTS}")
        self.model, self.output = model, output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.output == "hidden":
            return self.model(input_ids, attention_mask, output_hidden_states=True).hidden_states[-1]
        return self.model(input_ids, attention_mask).logits


@dataclass
class ExportReport:
    fp32_path: str
    int8_path: str | None
    output: str
    max_abs_diff: float
    fp32_bytes: int
    int8_bytes: int | None


def require_onnx() -> None:
    """onnx and onnxruntime are optional (serving only); say how to get them instead of an ImportError deep inside."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX serving needs {' and '.join(missing)}: pip install onnx onnxruntime")


def example_inputs(vocab_size: int, batch: int = 2, length: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch. Tracing with padding matters: the model skips the key mask when nothing is padded,
    and the traced graph keeps whichever branch the example took; with padding the mask is always applied."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


def export_fp32(model: BertForMaskedLM, path: Path, *, output: str = "logits", opset: int = 17) -> Path:
    """TorchScript-based export (dynamo=False): robust for SDPA with a boolean key mask; dynamic batch and length."""
    wrapper = ServingWrapper(model.eval(), output).eval()
    ids, mask = example_inputs(model.config.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the model's Python-side checks (padding present? length within positions?);
        # they only pick the masked branch and validate the example, see example_inputs.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose
        torch.onnx.export(
            wrapper, (ids, mask), str(tmp), dynamo=False, opset_version=opset,
            input_names=["input_ids", "attention_mask"], output_names=[output],
            dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                          output: {0: "batch", 1: "length"}},
        )
    os.replace(tmp, path)  # a half-written file never carries the final name
    return path


def session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session; `threads` caps intra-op threads (None = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess, input_ids: torch.Tensor | np.ndarray, attention_mask: torch.Tensor | np.ndarray) -> np.ndarray:
    feed = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
    return sess.run(None, feed)[0]


def check_against_torch(model: BertForMaskedLM, onnx_path: Path, *, output: str = "logits",
                        shapes: tuple[tuple[int, int], ...] = ((1, 8), (3, 24), (4, 40))) -> float:
    """Largest |ONNX - PyTorch| over padded batches of shapes other than the traced one (proves dynamic axes)."""
    wrapper = ServingWrapper(model.eval(), output).eval()
    sess = session(onnx_path)
    worst = 0.0
    for i, (b, s) in enumerate(shapes):
        ids, mask = example_inputs(model.config.vocab_size, b, s, seed=100 + i)
        with torch.no_grad():
            expected = wrapper(ids, mask).numpy()
        got = run_session(sess, ids, mask)
        if got.shape != expected.shape:
            raise AssertionError(f"{onnx_path}: output shape {got.shape} != PyTorch {expected.shape} for batch {b}, length {s}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    """Dynamic INT8: weights quantized once, activations per batch at run time; no calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = int8_path.with_name(f".{int8_path.name}.tmp-{os.getpid()}")
    quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, int8_path)
    return int8_path


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, output: str = "logits",
                 int8: bool = True, atol: float = 1e-4, opset: int = 17) -> ExportReport:
    """model_dir -> out_dir/model.onnx (+ model.int8.onnx); raises when ONNX and PyTorch differ by more than atol."""
    require_onnx()
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    out = Path(out_dir)
    fp32 = export_fp32(model, out / FP32_NAME, output=output, opset=opset)
    diff = check_against_torch(model, fp32, output=output)
    if not diff <= atol:
        raise ValueError(f"{fp32}: ONNX output differs from PyTorch by {diff:.3g} (> {atol}); the export is wrong, "
                         "please report it with the model's config.json")
    int8_path = quantize_int8(fp32, out / INT8_NAME) if int8 else None
    report = ExportReport(str(fp32), str(int8_path) if int8_path else None, output, diff, fp32.stat().st_size,
                          int8_path.stat().st_size if int8_path else None)
    (out / "export.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported BertForMaskedLM directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory for model.onnx, model.int8.onnx and export.json")
    p.add_argument("--output", choices=OUTPUTS, default="logits",
                   help="'logits': masked-LM logits [B,S,V]; 'hidden': last hidden states [B,S,H] (cell/gene embeddings)")
    p.add_argument("--no-int8", action="store_true", help="skip the dynamically quantized INT8 copy")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch|")
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().handlers[0].addFilter(lambda record: record.name.startswith("serving"))  # quantizer chatter
    report = export_model(args.model_dir, args.out, output=args.output, int8=not args.no_int8, atol=args.atol,
                          opset=args.opset)
    log.info("wrote %s (%.1f MB), max |ONNX - PyTorch| = %.2e", report.fp32_path, report.fp32_bytes / 1e6,
             report.max_abs_diff)
    if report.int8_path:
        log.info("wrote %s (%.1f MB)", report.int8_path, report.int8_bytes / 1e6)


if __name__ == "__main__":
    main()
