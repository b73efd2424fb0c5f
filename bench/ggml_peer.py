"""llama.cpp (llama-cpp-python) as a decode peer: a float32 copy of a GGUF model, and greedy
decoding through llama.cpp at batch 1.

llama.cpp reads GGUF files only. The engine reads the same GGUF through transformers,
which dequantises every tensor to float32; ``f32_gguf`` writes that float32 model back as
a GGUF file (every tensor dequantised with ``gguf.quants.dequantize``, the metadata copied,
the file type set to all-F32), so llama.cpp can run the very weights the engine runs, at
the engine's precision, beside its own speed on the quantised original. The copy is cached
under ``$CAI_HOME/gguf-f32`` by the source file's sha256.

llama-cpp-python is optional: nothing installs it (the README's benchmark section says how
to build it); the converter needs only the ``gguf`` package.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

# Keys the writer sets itself or that describe the quantisation being undone.
_OWN_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}
ALL_F32 = 0  # general.file_type of a model whose tensors are all float32 (llama.cpp's LLAMA_FTYPE_ALL_F32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def f32_gguf(src: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The float32 GGUF of ``src``: ``cache/<stem>.<sha256[:16]>.F32.gguf``, written on first
    use (atomically, so an interrupted run leaves no half file). ``cache`` defaults to
    ``$CAI_HOME/gguf-f32``."""
    from engine.loader import cai_home

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: GGUF file not found")
    folder = Path(cache) if cache is not None else cai_home() / "gguf-f32"
    out = folder / f"{src.stem}.{sha256_file(src)[:16]}.F32.gguf"
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            write_f32_gguf(src, tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def write_f32_gguf(src: Path, dst: Path) -> None:
    """Write ``src`` to ``dst`` with every tensor dequantised to float32, in the same order,
    and every metadata key copied with its type (the file type becomes all-F32)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _OWN_KEYS:
            continue  # the header (version, counts) and the keys above are the writer's own
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.ARRAY:
            raise ValueError(f"{src}: metadata {key!r} is an array of arrays, which this converter does not copy")
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        writer.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensor_bytes(path: str | os.PathLike) -> int:
    """Bytes of a GGUF file's tensors as stored (what a batch-1 decode step reads: every
    tensor once, the tied embedding read in full by the head)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def importable(name: str = "llama_cpp") -> bool:
    return importlib.util.find_spec(name) is not None


class LlamaCpp:
    """One GGUF file in llama.cpp, decoding greedily at batch 1: the prompt in one call,
    then one token per call, the next token the argmax of the last logits (EOS is never
    special, so every run makes ``new_tokens`` tokens)."""

    def __init__(self, path: str | os.PathLike, threads: int, n_ctx: int = 2048):
        import llama_cpp

        self.llama_cpp, self.path = llama_cpp, Path(path)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False, seed=0)
        self.threads, self.weight_bytes = threads, gguf_tensor_bytes(self.path)

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        llm, n_vocab = self.llm, self.llm.n_vocab()
        llm.reset()  # the next eval drops the KV cache past position 0
        llm.eval(list(ids))
        out = []
        for _ in range(new_tokens):
            last = self.llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last position's logits, in place
            tok = int(np.argmax(np.ctypeslib.as_array(last, shape=(n_vocab,))))
            out.append(tok)
            if len(out) < new_tokens:
                llm.eval([tok])
        return out

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        """(seconds, tokens) of one greedy run: prompt and decode, as the engine's row is timed."""
        start = time.perf_counter()
        out = self.greedy(ids, new_tokens)
        return time.perf_counter() - start, out


def gguf_source(model: str) -> Path | None:
    """The GGUF file behind ``--model``: the embedded default's, a .gguf path, else None."""
    if model == "default":
        from engine.loader import default_gguf_path

        return Path(default_gguf_path())
    return Path(model) if model.endswith(".gguf") else None


def peer_state(gguf: Path | None, sizes: list[int], device_type: str, module: str = "llama_cpp") -> str | None:
    """None when llama.cpp can run beside the engine, else why not (for the summary)."""
    if not importable(module):
        return "not importable (optional: see the README's benchmark section to build it)"
    if device_type != "cpu":
        return "CPU peer only"
    if gguf is None:
        return "no GGUF source (dummy or checkpoint model)"
    if 1 not in sizes:
        return "runs at batch 1 only (add 1 to --batch-sizes)"
    return None
