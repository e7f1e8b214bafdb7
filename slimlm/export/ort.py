"""The ONNX Runtime backend: an exported folder (export/onnx.py) run where slimlm runs a PyTorch model.

`OrtModel` takes the Transformer's call signature (input ids, a slimlm KV cache, cache positions), so the
generation loop (generate.py, LLM) and the serving engine (engine/core.py) drive it unchanged: sampling, stop
handling, continuous batching and the HTTP API are the same code as for the PyTorch backend. Each call turns the
cache's view of the step (positions, which slots each query sees) into the graph's inputs (attention_mask over
past + new tokens, position_ids, past_key_values), runs the graph and writes the new keys/values back into the
cache. LoRA adapters cannot be attached (merge them before export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.config import ModelConfig
from slimlm.errors import InputError

METADATA_FILE = "slimlm_export.json"  # what every exporter writes beside its graph: layout, inputs, outputs


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] left-padded and attention_mask [B, T] (1 = real token)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    return ids, mask


class OrtSession:
    """An InferenceSession over an exported folder, with numpy in and out in the graph's layout."""

    def __init__(self, folder: str | Path, threads: int = 0, provider: str = "cpu"):
        import onnxruntime as ort

        folder = Path(folder)
        meta_path = folder / METADATA_FILE
        if not meta_path.is_file():
            raise InputError(
                f"{folder} is not an ONNX export of slimlm (no {METADATA_FILE}): "
                "make one with `slimlm export onnx --model M --out DIR`"
            )
        self.meta = json.loads(meta_path.read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError("--device cuda with onnxruntime needs the onnxruntime-gpu package and a CUDA GPU")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(folder / self.meta["file"]), opts, providers=providers)
        self.inputs, self.outputs = self.meta["inputs"], self.meta["outputs"]
        self.past_shapes = [tuple(i.shape) for i in self.session.get_inputs()[3:]]  # [batch, Hkv, past, hd]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past keys/values for a prefill."""
        return [np.zeros((batch, s[1], 0, s[3]), dtype=np.float32) for s in self.past_shapes]

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: list[np.ndarray]
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """-> logits [B, T, V] (torch, fp32) and present keys/values [B, Hkv, P+T, hd] (numpy)."""
        feed = {
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
            "position_ids": position_ids.numpy(),
        }
        feed.update(zip(self.inputs[3:], past))
        logits, *present = self.session.run(None, feed)
        return torch.from_numpy(logits), present


class OrtModel:
    """An exported graph behind the Transformer's call signature (see the module docstring).

    It satisfies slimlm.protocol.CausalLM, so generation, serving and evaluation run it as they run a Transformer.
    """

    dtype = torch.float32  # the graph computes and returns fp32 logits and keys/values
    device = torch.device("cpu")  # tensors go in and out on the CPU (numpy), whatever runs the graph
    peft = None  # an exported graph carries no adapter: export merges it (--adapter) or refuses
    training = False  # a graph is inference-only: train(True) refuses

    def __init__(self, folder: str | Path, threads: int = 0):
        from slimlm.checkpoint.hf import read_hf_config

        self.folder = Path(folder)
        self.session = OrtSession(folder, threads)
        self.config: ModelConfig = read_hf_config(self.folder)
        # The scheme the exported model was quantized with (export metadata); None: exported dense.
        self.quantization: dict[str, Any] | None = self.session.meta.get("quantization")

    def eval(self) -> OrtModel:
        return self

    def train(self, mode: bool = True) -> OrtModel:
        if mode:
            raise ValueError("an ONNX Runtime model cannot train")
        return self

    def __call__(
        self,
        input_ids: torch.Tensor,
        cache=None,
        cache_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (the last logits_to_keep positions), reading/writing `cache`."""
        if segment_ids is not None:
            raise ValueError("the onnxruntime backend does not take packed segments")
        if cache is None:
            logits = self._run_without_cache(input_ids)
        else:
            logits = self._run_with_cache(input_ids, cache, cache_pos)
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def _run_without_cache(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        mask = torch.ones(B, T, dtype=torch.long)
        pos = torch.arange(T).expand(B, T).contiguous()
        return self.session.run(input_ids, mask, pos, self.session.empty_past(B))[0]

    def _run_with_cache(self, input_ids: torch.Tensor, cache, cache_pos: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        kv_len = cache.filled_len(cache_pos)
        positions, mask4 = cache.positions_and_mask(cache_pos, None, kv_len)  # [B, T], [B, 1, T, S] or None
        slots = cache_pos.expand(B, T) if cache_pos.dim() == 1 else cache_pos  # [B, T] where the new keys go
        attention_mask, P = graph_attention_mask(slots, mask4, getattr(cache, "idle", None))
        past = []
        for i in range(self.config.n_layers):
            k, v = cache.layer(i)  # [B, Hkv, S, hd]
            past += [
                k[:, :, :P].contiguous().numpy(),
                v[:, :, :P].contiguous().numpy(),
            ]  # fp32: the cache has the model dtype
        logits, present = self.session.run(input_ids, attention_mask, positions.contiguous(), past)
        for i in range(self.config.n_layers):  # present = past + the T new entries
            k_new = torch.from_numpy(present[2 * i][:, :, P:])
            v_new = torch.from_numpy(present[2 * i + 1][:, :, P:])
            cache.update(i, cache_pos, k_new, v_new)
        return logits


def graph_attention_mask(
    slots: torch.Tensor, mask4: torch.Tensor | None, idle: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """The graph's attention_mask [B, P+T] and P, for new tokens going to cache slots [B, T].

    The past handed to the graph is cache slots [0, P), P = the first new slot of the furthest busy row; a row sees
    past slot j when j is before its own first new slot and the cache's mask lets its last query see j (this
    drops left padding and stale slots). Idle rows (serving: no work this step) see only their own token.
    """
    B, T = slots.shape
    busy = torch.ones(B, dtype=torch.bool) if idle is None else ~idle
    first = slots[:, 0]
    P = int(first[busy].max()) if bool(busy.any()) else 0
    j = torch.arange(P)
    past_visible = (j[None, :] < first[:, None]) & busy[:, None]  # [B, P]
    new_visible = torch.ones(B, T, dtype=torch.bool)
    if mask4 is not None:
        last = mask4[:, 0, -1]  # [B, S]: what each row's last query may see
        past_visible &= last[:, :P]
        new_visible = last.gather(1, slots)
    return torch.cat([past_visible, new_visible], dim=1).long(), P
