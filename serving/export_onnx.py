"""Export a BertForMaskedLM or a fine-tuned BertForSequenceClassification directory to ONNX (dynamic batch and
length), fuse it for onnxruntime, check it against PyTorch, and write a dynamically quantized INT8 copy beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from common.errors import run_cli
from model.bert_weights import read_config_json
from model.classifier import BertForCellClassification
from modeling_bert_te import BertForMaskedLM

if TYPE_CHECKING:
    import onnxruntime
    import transformers

log = logging.getLogger("serving.export_onnx")

OUTPUTS = (
    "logits",
    "hidden",
)  # full masked-LM logits [B,S,V], or the last hidden states [B,S,H] (embeddings)
FP32_NAME, INT8_NAME = "model.onnx", "model.int8.onnx"
CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"

ServedModel = BertForMaskedLM | BertForCellClassification


def load_served_model(model_dir: str | os.PathLike) -> ServedModel:
    """The model a directory's config.json names: a fine-tuned sequence classifier, else a masked-LM model."""
    architectures = read_config_json(model_dir).get("architectures") or []
    if CLASSIFIER_ARCHITECTURE in architectures:
        return BertForCellClassification.from_pretrained(model_dir).eval()
    return BertForMaskedLM.from_pretrained(model_dir).eval()


class ServingWrapper(nn.Module):
    """(input_ids, attention_mask) -> one tensor, the shape ONNX wants: no dataclass, no optional arguments.

    Both models answer `model(input_ids, attention_mask).logits`: [B,S,V] for the masked-LM model, [B,n_labels]
    for the classifier. A classifier has no `hidden` output: export its masked-LM model for embeddings.
    """

    def __init__(self, model: ServedModel, output: str) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output {output!r} is unknown; choose one of {OUTPUTS}")
        if output == "hidden" and isinstance(model, BertForCellClassification):
            raise ValueError(
                "a classifier exports its logits only; export its masked-LM model for hidden states"
            )
        self.model, self.output = model, output

    @property
    def per_token(self) -> bool:
        """Whether the output has a length axis (masked-LM logits, hidden states) or one row per cell."""
        return not isinstance(self.model, BertForCellClassification)

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
    fp32_bytes_unshared: int  # before store_repeats_once: the tied embedding stored twice
    fused: dict[str, int] = field(
        default_factory=dict
    )  # onnxruntime contrib ops the optimizer made; {} = not optimized


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it takes `path`'s name only once written whole, so a
    half-written file never carries the final name (and a failed write leaves nothing behind)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def example_inputs(
    vocab_size: int, batch: int = 2, length: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch. Tracing with padding matters: the model skips the key mask when nothing is padded,
    and the traced graph keeps whichever branch the example took; with padding the mask is always applied."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    ids[mask == 0] = 0
    return ids, mask


SDPA = "aten::scaled_dot_product_attention"


def _eager_attention(
    g, query, key, value, attn_mask, dropout_p: float, is_causal: bool, scale, enable_gqa: bool
):
    """ONNX for SDPA as BERT's eager attention: softmax(q k^T / sqrt(d) + (1 - mask) * min) v.

    torch's own SDPA export (Where(mask, 0, -inf), sqrt'd scales, an IsNaN guard after Softmax) matches none of
    onnxruntime's attention fusions, so it stays separate MatMul/Softmax nodes, 2-3x slower than PyTorch's fused
    kernel at 512 genes. This is the pattern the BERT fusion knows (Mul <- Sub <- Cast <- Unsqueeze of the mask);
    the additive mask gives what the boolean one does to any row with a real key. Eval attention only.
    """
    from onnx import TensorProto
    from torch.onnx import symbolic_helper

    head_dim = symbolic_helper._get_tensor_sizes(query)[-1]
    if dropout_p or is_causal or enable_gqa or not symbolic_helper._is_none(scale) or head_dim is None:
        raise NotImplementedError(
            "the fusable attention export covers eval SDPA (key mask, default scale) only"
        )
    scores = g.op("MatMul", query, g.op("Transpose", key, perm_i=[0, 1, 3, 2]))
    scores = g.op("Div", scores, g.op("Constant", value_t=torch.tensor(math.sqrt(head_dim))))
    if not symbolic_helper._is_none(attn_mask):
        bias = attn_mask
        if attn_mask.type().scalarType() == "Bool":
            dropped = g.op(
                "Sub",
                g.op("Constant", value_t=torch.tensor(1.0)),
                g.op("Cast", attn_mask, to_i=TensorProto.FLOAT),
            )
            bias = g.op(
                "Mul", dropped, g.op("Constant", value_t=torch.tensor(torch.finfo(torch.float32).min))
            )
        scores = g.op("Add", scores, bias)
    return g.op("MatMul", g.op("Softmax", scores, axis_i=-1), value)


@contextmanager
def fusable_attention(opset: int) -> Iterator[None]:
    """Export SDPA as _eager_attention within the block only (the symbolic registry is global)."""
    from torch.onnx import symbolic_helper

    symbolic = symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")(_eager_attention)
    torch.onnx.register_custom_op_symbolic(SDPA, symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(SDPA, opset)


def export_fp32(model: ServedModel, path: Path, *, output: str = "logits", opset: int = 17) -> Path:
    """TorchScript-based export (dynamo=False), attention as _eager_attention; dynamic batch and length."""
    wrapper = ServingWrapper(model.eval(), output).eval()
    output_axes = {0: "batch", 1: "length"} if wrapper.per_token else {0: "batch"}
    ids, mask = example_inputs(model.config.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), fusable_attention(opset), _replacing(path) as tmp:
        # The tracer warns about the model's Python-side checks (padding present? length within positions?);
        # they only pick the masked branch and validate the example, see example_inputs.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=[output],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "length"},
                "attention_mask": {0: "batch", 1: "length"},
                output: output_axes,
            },
        )
    return path


def fuse_for_onnxruntime(path: Path, config: transformers.PretrainedConfig) -> dict[str, int]:
    """Rewrite `path` with onnxruntime's BERT fusions (Attention, SkipLayerNormalization, ...); returns the count of
    each fused op. Python fusions only (opt_level 0): onnxruntime's own graph passes run anyway when a session
    loads, and folding constants here would store the tied decoder's transposed embedding a second time."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(
        True
    )  # the [B,S] mask as given; the default (lengths) assumes right padding
    optimized = optimize_model(
        str(path),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        opt_level=0,
        optimization_options=options,
    )
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    if fused.get("Attention", 0) != config.num_hidden_layers:
        log.warning(
            "%s: %d of %d attention layers fused; the rest run as separate nodes (slower, still checked)",
            path,
            fused.get("Attention", 0),
            config.num_hidden_layers,
        )
    with _replacing(path) as tmp:
        optimized.save_model_to_file(str(tmp))
    return fused


def session(path: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session; `threads` caps intra-op threads (None = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(
    sess: onnxruntime.InferenceSession,
    input_ids: torch.Tensor | np.ndarray,
    attention_mask: torch.Tensor | np.ndarray,
) -> np.ndarray:
    feed = {
        "input_ids": np.asarray(input_ids, dtype=np.int64),
        "attention_mask": np.asarray(attention_mask, dtype=np.int64),
    }
    return sess.run(None, feed)[0]


def check_against_torch(
    model: ServedModel,
    onnx_path: Path,
    *,
    output: str = "logits",
    shapes: tuple[tuple[int, int], ...] = ((1, 8), (3, 24), (4, 40)),
) -> float:
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
            raise AssertionError(
                f"{onnx_path}: output shape {got.shape} != PyTorch {expected.shape} for batch {b}, length {s}"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


ALIAS_MIN_ELEMENTS = 4096  # smaller initializers are not worth a node: the point is the big matrices


def _alias_node(kept: str, kept_array: np.ndarray, name: str, array: np.ndarray):
    """A node computing initializer `name` from initializer `kept`, or None when their values differ."""
    from onnx import helper

    if array.shape == kept_array.shape and np.array_equal(array, kept_array):
        return helper.make_node("Identity", [kept], [name], name=f"repeat_of/{kept}")
    if array.ndim == 2 and array.shape == kept_array.T.shape and np.array_equal(array, kept_array.T):
        return helper.make_node("Transpose", [kept], [name], perm=[1, 0], name=f"transpose_of/{kept}")
    return None


def store_repeats_once(path: Path) -> int:
    """Rewrite `path` so an initializer repeating another (equal, or equal once transposed) is computed from it.

    The TorchScript exporter folds the tied decoder's transpose of the word embeddings into a second [H, V]
    constant; a Transpose node of the embeddings replaces it, so the file stores the matrix once (onnxruntime
    folds the node again when a session loads, in memory, so serving speed is unchanged). Returns how many
    initializers were replaced.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    kept: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    aliases, repeated = [], []
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) < ALIAS_MIN_ELEMENTS:
            continue
        array = numpy_helper.to_array(init)
        candidates = kept.setdefault((init.data_type, tuple(sorted(init.dims))), [])
        node = next(
            (n for name, a in candidates if (n := _alias_node(name, a, init.name, array)) is not None), None
        )
        if node is None:
            candidates.append((init.name, array))
        else:
            aliases.append(node)
            repeated.append(init)
    if not aliases:
        return 0
    for init in repeated:
        model.graph.initializer.remove(init)
    for node in reversed(aliases):
        model.graph.node.insert(0, node)  # first, so the graph stays topologically sorted
    with _replacing(path) as tmp:
        onnx.save(model, str(tmp))
    return len(aliases)


def _gather_tables(path: Path) -> list[str]:
    """Initializers that a Gather looks rows up in: the word and position embeddings."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return sorted({n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in initializers})


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    """Dynamic INT8: weights quantized once, activations per batch at run time; no calibration data needed.

    Give it the graph as exported, before store_repeats_once: the quantizer only quantizes a MatMul whose weight
    is an initializer, so a decoder computed as Transpose(embeddings) would stay fp32 beside the embeddings'
    own INT8 copy. Gather tables are quantized like MatMul weights (INT8, 7 bits, symmetric, one scale) instead of
    the default asymmetric UINT8, so the tied decoder's INT8 weight is their exact transpose and is stored once.
    Weights use 7 bits (`reduce_range`): on CPUs without VNNI (AVX2 only), onnxruntime's u8 x s8 kernels add
    pairs of products in int16, which saturates with full-range weights (a classifier lost 2.3 points of
    accuracy that way, and none with 7 bits). The file may be served anywhere, so it is made safe everywhere.
    """
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    overrides = {
        name: [{"quant_type": QuantType.QInt8, "reduce_range": True}] for name in _gather_tables(fp32_path)
    }
    with _replacing(int8_path) as tmp:
        # onnx's shape inference cannot type the outputs of a fused graph's contrib ops (Attention,
        # SkipLayerNormalization); every activation here is fp32.
        quantize_dynamic(
            str(fp32_path),
            str(tmp),
            weight_type=QuantType.QInt8,
            reduce_range=True,
            extra_options={"TensorQuantOverrides": overrides, "DefaultTensorType": TensorProto.FLOAT},
        )
        store_repeats_once(tmp)
    return int8_path


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    output: str = "logits",
    int8: bool = True,
    atol: float = 1e-4,
    opset: int = 17,
    optimize: bool = True,
) -> ExportReport:
    """model_dir (masked-LM or classifier) -> out_dir/model.onnx (+ model.int8.onnx); raises when ONNX and PyTorch
    differ by more than atol. `optimize` fuses for onnxruntime (contrib ops: the file then needs onnxruntime);
    the INT8 copy is quantized from the fused graph, so its attention runs as one QAttention node."""
    require_onnx()
    model = load_served_model(model_dir)
    out = Path(out_dir)
    fp32 = export_fp32(model, out / FP32_NAME, output=output, opset=opset)
    fused = fuse_for_onnxruntime(fp32, model.config) if optimize else {}
    int8_path = quantize_int8(fp32, out / INT8_NAME) if int8 else None  # before sharing: see quantize_int8
    unshared_bytes = fp32.stat().st_size
    store_repeats_once(fp32)
    diff = check_against_torch(model, fp32, output=output)
    if not diff <= atol:
        raise ValueError(
            f"{fp32}: ONNX output differs from PyTorch by {diff:.3g} (> {atol}); the export is wrong, "
            "please report it with the model's config.json"
        )
    report = ExportReport(
        str(fp32),
        str(int8_path) if int8_path else None,
        output,
        diff,
        fp32.stat().st_size,
        int8_path.stat().st_size if int8_path else None,
        unshared_bytes,
        fused,
    )
    (out / "export.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="exported BertForMaskedLM directory, or the final_model of finetune.py (a classifier)",
    )
    p.add_argument(
        "--out", required=True, help="output directory for model.onnx, model.int8.onnx and export.json"
    )
    p.add_argument(
        "--output",
        choices=OUTPUTS,
        default="logits",
        help="'logits': masked-LM logits [B,S,V] (a classifier's: [B,n_labels]); 'hidden': last hidden "
        "states [B,S,H] (cell/gene embeddings, masked-LM models only)",
    )
    p.add_argument("--no-int8", action="store_true", help="skip the dynamically quantized INT8 copy")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch|")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="skip onnxruntime's fusions: plain ONNX ops that any runtime runs, but slower in onnxruntime",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().handlers[0].addFilter(
        lambda record: record.name.startswith("serving")
    )  # quantizer chatter
    report = export_model(
        args.model_dir,
        args.out,
        output=args.output,
        int8=not args.no_int8,
        atol=args.atol,
        opset=args.opset,
        optimize=not args.no_optimize,
    )
    log.info("fused for onnxruntime: %s", report.fused or "nothing (--no-optimize)")
    log.info(
        "wrote %s (%.1f MB; %.1f MB before repeated weights were stored once), max |ONNX - PyTorch| = %.2e",
        report.fp32_path,
        report.fp32_bytes / 1e6,
        report.fp32_bytes_unshared / 1e6,
        report.max_abs_diff,
    )
    if report.int8_path:
        log.info("wrote %s (%.1f MB)", report.int8_path, report.int8_bytes / 1e6)


if __name__ == "__main__":
    run_cli(main)
