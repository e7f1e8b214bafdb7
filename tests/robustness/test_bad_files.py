"""Bad files (issue 15): truncated or bit-flipped weights, wrong configs, foreign adapters, broken JSONL.

Every case drives the real CLI in-process (`slimlm.cli.main`) on tiny random models and checks what a user sees:
exit status 2 and one line on stderr that names the bad file (and, for data, the line), never a traceback.
Random cut points and bit flips come from a seeded generator; `make soak` runs many more of them.

A flipped bit inside tensor data cannot be detected by the format (it only changes a weight), so for those the
property is "loads and runs, or gives the clear error"; flips in a safetensors header must always be refused.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimlm.cli import main

from .conftest import trials

GEN = ["--prompt", "hi", "--max-new-tokens", "1", "--dtype", "fp32"]
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `slimlm argv` in-process; (exit status, stderr). An exception escaping main comes back as status -1
    with its traceback as stderr, so the random-input loops count it as a failure (and still record their row)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except Exception:
        return -1, capsys.readouterr().err + traceback.format_exc()
    return rc, capsys.readouterr().err


def is_clear(rc: int, err: str, names: str | Path) -> bool:
    """Status 2 and exactly one stderr line "slimlm CMD: error: ..." that names `names` (a file or folder)."""
    lines = err.strip().splitlines()
    return (
        rc == 2
        and len(lines) == 1
        and lines[0].startswith("slimlm ")
        and ": error: " in lines[0]
        and str(names) in lines[0]
        and "Traceback" not in err
    )


def assert_clear(rc: int, err: str, names: str | Path, *needles: str) -> None:
    assert is_clear(rc, err, names), f"rc={rc}, stderr={err!r}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip(data: bytes, pos: int, bit: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]


# ---------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def weights(tiny_llama) -> tuple[Path, bytes, int]:
    """(folder, bytes of its model.safetensors, header length n: the header is bytes 8 .. 8 + n)."""
    data = (tiny_llama[0] / "model.safetensors").read_bytes()
    return tiny_llama[0], data, int.from_bytes(data[:8], "little")


def _with_weights(tmp_path: Path, folder: Path, data: bytes, name: str) -> Path:
    out = copy_model(folder, tmp_path / name)
    (out / "model.safetensors").write_bytes(data)
    return out


def test_truncated_safetensors(weights, tmp_path, capsys, record):
    folder, data, n = weights
    rng = random.Random(0)
    cuts = [0, 4, 7, 8, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (len(data) + 8 + n) // 2, len(data) - 1]
    cuts += [rng.randrange(len(data)) for _ in range(trials(10, 300))]
    bad = []
    for i, cut in enumerate(cuts):
        m = _with_weights(tmp_path, folder, data[:cut], f"cut{i}")
        rc, err = cli(capsys, "generate", "--model", m, *GEN)
        if not is_clear(rc, err, m / "model.safetensors"):
            bad.append((cut, rc, err))
    record(kind="bad file: truncated safetensors", tried=len(cuts), failures=len(bad))
    assert not bad, bad[:3]


def test_truncated_safetensors_says_so(weights, tmp_path, capsys):
    folder, data, n = weights
    m = _with_weights(tmp_path, folder, data[: len(data) // 2], "half")
    rc, err = cli(capsys, "generate", "--model", m, *GEN)
    assert_clear(rc, err, m / "model.safetensors", "truncated", "download it again")
    m = _with_weights(tmp_path, folder, data[: 8 + n // 2], "mid_header")
    assert_clear(*cli(capsys, "generate", "--model", m, *GEN), m / "model.safetensors", "no valid safetensors header")


def _metadata_span(data: bytes, n: int) -> range:
    """Byte positions of the header's "__metadata__": {...} object, whose strings nothing checks."""
    start = data.index(b'"__metadata__"', 8, 8 + n)
    return range(start, data.index(b"}", start) + 1)


def test_safetensors_header_bit_flips_are_refused(weights, tmp_path, capsys, record):
    """Every flip in the length prefix or the JSON header (outside __metadata__) must give the clear error."""
    folder, data, n = weights
    free = _metadata_span(data, n)
    rng = random.Random(1)
    bad, tried = [], 0
    for i in range(trials(25, 600)):
        pos, bit = rng.randrange(8 + n), rng.randrange(8)
        m = _with_weights(tmp_path, folder, flip(data, pos, bit), f"flip{i}")
        rc, err = cli(capsys, "generate", "--model", m, *GEN)
        tried += 1
        ok = (rc in (0, 2) and (rc == 0 or is_clear(rc, err, m))) if pos in free else is_clear(rc, err, m)
        if not ok:
            bad.append((pos, bit, rc, err))
        shutil.rmtree(m)
    record(kind="bad file: bit-flipped safetensors header", tried=tried, failures=len(bad))
    assert not bad, bad[:3]


def test_safetensors_data_bit_flips_load_or_fail_clearly(weights, tmp_path, capsys, record):
    """A flip in tensor data changes one weight (maybe to NaN): generation must still run, or fail clearly."""
    folder, data, n = weights
    rng = random.Random(2)
    bad = []
    count = trials(4, 100)
    for i in range(count):
        pos, bit = rng.randrange(8 + n, len(data)), rng.randrange(8)
        m = _with_weights(tmp_path, folder, flip(data, pos, bit), f"dflip{i}")
        rc, err = cli(capsys, "generate", "--model", m, *GEN)
        if not (rc == 0 or is_clear(rc, err, m)):
            bad.append((pos, bit, rc, err))
        shutil.rmtree(m)
    record(kind="bad file: bit-flipped safetensors data", tried=count, failures=len(bad))
    assert not bad, bad[:3]


def _rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_safetensors_that_do_not_fit_the_config(tiny_llama, tmp_path, capsys):
    m = copy_model(tiny_llama[0], tmp_path / "missing")
    _rewrite_weights(m, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    assert_clear(*cli(capsys, "generate", "--model", m, *GEN), m, "missing tensors layers.1.mlp.up_proj.weight")

    m = copy_model(tiny_llama[0], tmp_path / "shape")
    _rewrite_weights(m, lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}))
    assert_clear(
        *cli(capsys, "generate", "--model", m, *GEN),
        m,
        "'layers.0.mlp.up_proj.weight' has shape (96, 64)",
        "config expects (128, 64)",
    )

    m = copy_model(tiny_llama[0], tmp_path / "config_shape")  # the config, not the weights, is off
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    assert_clear(*cli(capsys, "generate", "--model", m, *GEN), m, "config expects (64, 96)")

    m = copy_model(tiny_llama[0], tmp_path / "layers")  # checked before building: 10**6 layers must not hang
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**6}))
    assert_clear(
        *cli(capsys, "generate", "--model", m, *GEN), m, "config says 1000000 layers but the weights hold tensors for 2"
    )

    m = copy_model(tiny_llama[0], tmp_path / "foreign")
    _rewrite_weights(m, lambda s: s.update({"model.vision_tower.weight": torch.zeros(2)}))
    assert_clear(
        *cli(capsys, "generate", "--model", m, *GEN),
        m / "model.safetensors",
        "unknown tensor 'model.vision_tower.weight'",
    )


def test_api_load_raises_checkpoint_error(weights, tmp_path):
    import slimlm
    from slimlm.checkpoint import CheckpointError

    folder, data, _ = weights
    m = _with_weights(tmp_path, folder, data[:-3], "api")
    with pytest.raises(CheckpointError, match=re.escape(str(m / "model.safetensors")) + ".*truncated"):
        slimlm.load(str(m), dtype="fp32")


def test_sharded_index_that_is_not_an_object(tiny_llama, tmp_path, capsys):
    m = copy_model(tiny_llama[0], tmp_path / "index")
    (m / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    assert_clear(*cli(capsys, "generate", "--model", m, *GEN), m / "model.safetensors.index.json", "weight_map")


# ---------------------------------------------------------------- config.json

CONFIG_CASES = {  # name: (change to config.json, what the error line must say)
    "string size": ({"hidden_size": "64"}, '"hidden_size" must be a positive integer, got "64"'),
    "zero heads": ({"num_attention_heads": 0}, '"num_attention_heads" must be a positive integer, got 0'),
    "negative layers": ({"num_hidden_layers": -2}, '"num_hidden_layers" must be a positive integer, got -2'),
    "float vocab": ({"vocab_size": 384.5}, '"vocab_size" must be a positive integer, got 384.5'),
    "bool as size": ({"intermediate_size": True}, '"intermediate_size" must be a positive integer, got true'),
    "heads do not divide hidden": (
        {"num_attention_heads": 6, "num_key_value_heads": 6, "head_dim": None},
        '"hidden_size" (64) must be a multiple of "num_attention_heads" (6)',
    ),
    "kv heads do not divide heads": (
        {"num_key_value_heads": 3},
        '"num_attention_heads" (4) must be a multiple of "num_key_value_heads" (3)',
    ),
    "string eps": ({"rms_norm_eps": "1e-5"}, '"rms_norm_eps" must be a positive number, got "1e-5"'),
    "string bool": ({"tie_word_embeddings": "false"}, '"tie_word_embeddings" must be true or false'),
    "rope list": ({"rope_scaling": [8.0], "rope_parameters": None}, '"rope_scaling" must be an object'),
    "rope string factor": (
        {"rope_parameters": {"rope_type": "linear", "factor": "2", "rope_theta": 10000.0}},
        '"rope_parameters.factor" must be a positive number, got "2"',
    ),
    "eos string": ({"eos_token_id": "2"}, '"eos_token_id" must be a token id'),
    "missing key": ({"vocab_size": None}, "config is missing vocab_size"),
    "unknown architecture": ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    "quantization not an object": ({"quantization_config": "int8"}, "quantization_config must be an object"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_json_with_wrong_values(tiny_llama, tmp_path, capsys, case):
    change, needle = CONFIG_CASES[case]
    m = copy_model(tiny_llama[0], tmp_path / "m")
    cfg = {**json.loads((m / "config.json").read_text()), **change}
    if change.get("vocab_size", 0) is None:
        del cfg["vocab_size"]
    (m / "config.json").write_text(json.dumps(cfg))
    for command in (["generate", "--model", m, *GEN], ["info", "--model", m]):
        if case == "quantization not an object" and command[0] == "info":
            continue  # info reads the shape only
        assert_clear(*cli(capsys, *command), m / "config.json", needle)


@pytest.mark.parametrize(
    "text,needle",
    [
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "holds a JSON list, not an object"),
        (b'"llama"', "holds a JSON str"),
        (b"", "is not valid JSON"),
        (b'{"model_type": "llama", "x": "caf\xe9"}', "is not UTF-8 text (byte 0xe9 at offset 33)"),
    ],
)
def test_config_json_that_is_not_a_json_object(tiny_llama, tmp_path, capsys, text, needle):
    m = copy_model(tiny_llama[0], tmp_path / "m")
    (m / "config.json").write_bytes(text)
    for command in (["generate", "--model", m, *GEN], ["info", "--model", m], ["eval", "--model", m, "--speed"]):
        assert_clear(*cli(capsys, *command), m / "config.json", needle)


@pytest.mark.parametrize(
    "name,text",
    [
        ("tokenizer.json", b"{bad"),
        ("tokenizer.json", b"\xff\xfe"),
        ("tokenizer_config.json", b"[1]"),
        ("generation_config.json", b"{bad"),
    ],
)
def test_bad_tokenizer_files(tiny_llama, tmp_path, capsys, name, text):
    m = copy_model(tiny_llama[0], tmp_path / "m")
    (m / name).write_bytes(text)
    rc, err = cli(capsys, "generate", "--model", m, *GEN)
    assert_clear(rc, err, m)
    assert name == "tokenizer.json" or name in err or "its tokenizer cannot be loaded" in err


# ---------------------------------------------------------------- GGUF


def write_gguf(path: Path, hf_model, tokenizer_dir: Path, tokenizer: bool = True) -> Path:
    """A llama GGUF (F32 tensors, embedded gpt2-style BPE tokenizer) of a tiny HF model; q/k rows not permuted
    (the weights are random, only the file structure matters here)."""
    import gguf

    from slimlm.checkpoint.gguf import GGUF_TO_SLIMLM
    from slimlm.checkpoint.hf import hf_to_slimlm_name

    c, tok = hf_model.config, json.loads((tokenizer_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if tokenizer:
        vocab = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab)
        w.add_token_types([3 if i < 3 else 1 for i in range(len(vocab))])  # 3 = control (the special tokens)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    to_gguf = {v: k for k, v in GGUF_TO_SLIMLM.items()}
    for name, t in hf_model.state_dict().items():
        ours = hf_to_slimlm_name(name)
        m = re.match(r"layers\.(\d+)\.(.*)", ours)
        w.add_tensor(
            to_gguf["layers.{}." + m.group(2)].format(m.group(1)) if m else to_gguf[ours],
            t.detach().float().numpy().copy(),
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tokenizer_dir) -> tuple[Path, bytes, int]:
    """(path, bytes, offset where tensor data begins) of a good tiny GGUF file."""
    import gguf
    from conftest import make_hf_model

    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", make_hf_model("llama", seed=3), tokenizer_dir)
    return path, path.read_bytes(), gguf.GGUFReader(str(path)).data_offset


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))  # converted folders go here, not ~/.cache
    # The CPU kernels are built under SLIMLM_CACHE too: a fresh cache would compile them (a minute) for nothing.
    monkeypatch.setenv("SLIMLM_KERNELS", "0")
    return tmp_path / "cache"


def test_good_gguf_loads(gguf_file, gguf_cache, capsys):
    rc, err = cli(capsys, "generate", "--model", gguf_file[0], *GEN)
    assert rc == 0, err


def test_truncated_gguf(gguf_file, gguf_cache, tmp_path, capsys, record):
    from slimlm.checkpoint import CheckpointError
    from slimlm.checkpoint.gguf import load_gguf

    path, data, data_offset = gguf_file
    rng = random.Random(3)
    cuts = [0, 3, 4, 16, 24, 100, data_offset // 2, data_offset - 1, data_offset, data_offset + 100, len(data) - 1]
    cuts += [rng.randrange(len(data)) for _ in range(trials(8, 200))]
    bad = []
    for i, cut in enumerate(cuts):
        p = tmp_path / f"cut{i}.gguf"
        p.write_bytes(data[:cut])
        rc, err = cli(capsys, "info", "--model", p)
        if not is_clear(rc, err, p):
            bad.append((cut, rc, err))
        with pytest.raises(CheckpointError, match=re.escape(str(p))):
            load_gguf(p)
        p.unlink()
    record(kind="bad file: truncated GGUF", tried=len(cuts), failures=len(bad))
    assert not bad, bad[:3]


def test_bit_flipped_gguf(gguf_file, gguf_cache, tmp_path, capsys, record):
    """GGUF has no checksum: a flip in a value (a float, a name nobody reads) can go unnoticed. The property is
    that every flip either loads or gives the clear error; structure flips must not hang or escape as exceptions."""
    path, data, data_offset = gguf_file
    rng = random.Random(4)
    bad, refused, count = [], 0, trials(16, 400)
    for i in range(count):
        # three in four flips land in the header and metadata, the rest in tensor data
        pos = rng.randrange(data_offset) if i % 4 else rng.randrange(data_offset, len(data))
        p = tmp_path / f"flip{i}.gguf"
        p.write_bytes(flip(data, pos, rng.randrange(8)))
        rc, err = cli(capsys, "info", "--model", p)
        refused += rc == 2
        if not (rc == 0 or is_clear(rc, err, p)):
            bad.append((pos, rc, err))
        p.unlink()
    record(kind="bad file: bit-flipped GGUF", tried=count, failures=len(bad), refused=refused)
    assert not bad, bad[:3]


def _set_gguf_uint32(data: bytes, path: Path, key: str, value: int) -> bytes:
    """The file with the uint32 metadata value `key` replaced (as a bit flip there would)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields[key]
    at = field.offset + sum(part.nbytes for part in field.parts[: field.data[0]])  # where the value starts
    return data[:at] + value.to_bytes(4, "little") + data[at + 4 :]


@pytest.mark.parametrize(
    "key,value,needle",
    [
        (
            "llama.block_count",
            2 + 2**20,
            "its config says 1048578 layers but the weights hold tensors for 2",
        ),  # not a hang
        ("llama.attention.head_count", 0, "n_heads must be a positive integer, got 0"),  # not a ZeroDivisionError
        ("llama.embedding_length", 2**31, "its config describes a model that cannot be built"),  # not a huge alloc
    ],
)
def test_gguf_metadata_values_out_of_range(gguf_file, tmp_path, capsys, gguf_cache, key, value, needle):
    path, data, _ = gguf_file
    p = tmp_path / "bad.gguf"
    p.write_bytes(_set_gguf_uint32(data, path, key, value))
    assert_clear(*cli(capsys, "info", "--model", p), p, needle)


def test_gguf_without_tokenizer(tmp_path, gguf_cache, tokenizer_dir, capsys):
    from conftest import make_hf_model

    p = write_gguf(tmp_path / "notok.gguf", make_hf_model("llama", seed=3), tokenizer_dir, tokenizer=False)
    assert_clear(*cli(capsys, "info", "--model", p), p, "its tokenizer cannot be read")


# ---------------------------------------------------------------- adapters


def _lora_for(folder: Path, out: Path, **options) -> Path:
    from slimlm.checkpoint.hf import load_hf_folder
    from slimlm.peft import apply_peft, make_config, save_adapter

    _, model = load_hf_folder(folder)
    apply_peft(model, "lora", make_config("lora", options or dict(r=4, alpha=8)))
    return save_adapter(model, out)


@pytest.fixture(scope="module")
def adapters(make_model_folder, tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """LoRA adapters trained on other bases, plus a good one for tiny_llama."""
    root = tmp_path_factory.mktemp("adapters")
    narrow, _ = make_model_folder("llama", seed=2, tokenizer=False, hidden_size=32, head_dim=8)
    deeper, _ = make_model_folder("llama", seed=2, tokenizer=False, num_hidden_layers=3)
    return {
        "good": _lora_for(tiny_llama[0], root / "good"),
        "hidden": _lora_for(narrow, root / "hidden"),
        "layers": _lora_for(deeper, root / "layers"),
    }


def _both_commands(base: Path, adapter: Path, out: Path) -> list[list]:
    return [
        ["generate", "--model", base, "--adapter", adapter, *GEN],
        ["merge", "--model", base, "--adapter", adapter, "--out", out],
    ]


@pytest.mark.parametrize(
    "which,needle",
    [
        ("hidden", "its tensor sizes differ, so its base model has another hidden or intermediate size"),
        ("layers", "the adapter has weights for 3 layers, this model has 2"),
    ],
)
def test_adapter_for_another_base(adapters, tiny_llama, tmp_path, capsys, which, needle):
    for command in _both_commands(tiny_llama[0], adapters[which], tmp_path / "merged"):
        assert_clear(*cli(capsys, *command), adapters[which], needle)
    assert not (tmp_path / "merged").exists()


def _adapter_copy(adapters, tmp_path: Path, name: str) -> Path:
    return copy_model(adapters["good"], tmp_path / name)


ADAPTER_CONFIG_CASES = {  # name: (change to adapter_config.json, what the error line must say)
    "other target names": ({"target_modules": ["c_attn", "c_proj"]}, "adapter targets ['c_attn', 'c_proj']"),
    "string rank": ({"r": "4"}, "lora r must be >= 1, got '4'"),
    "no rank": ({"r": None}, "missing key 'r'"),
    "unknown type": ({"peft_type": "IA3"}, "adapter peft_type 'IA3' is not one slimlm loads"),
}


@pytest.mark.parametrize("case", ADAPTER_CONFIG_CASES)
def test_adapter_config_with_wrong_values(adapters, tiny_llama, tmp_path, capsys, case):
    change, needle = ADAPTER_CONFIG_CASES[case]
    a = _adapter_copy(adapters, tmp_path, "a")
    cfg = {**json.loads((a / "adapter_config.json").read_text()), **change}
    cfg = {k: v for k, v in cfg.items() if not (k == "r" and v is None)}
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    for command in [*_both_commands(tiny_llama[0], a, tmp_path / "merged"), ["info", "--model", a]]:
        assert_clear(*cli(capsys, *command), a, needle)


def test_adapter_with_targets_that_disagree_with_its_weights(adapters, tiny_llama, tmp_path, capsys):
    a = _adapter_copy(adapters, tmp_path, "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "v_proj"]}))
    for command in _both_commands(tiny_llama[0], a, tmp_path / "merged"):
        assert_clear(*cli(capsys, *command), a, "LoRA weights do not fit this model", "unexpected")


@pytest.mark.parametrize(
    "text,needle", [(b"[1]", "holds a JSON list"), (b"{", "is not valid JSON"), (b"\xff{}", "is not UTF-8 text")]
)
def test_adapter_config_that_is_not_a_json_object(adapters, tiny_llama, tmp_path, capsys, text, needle):
    a = _adapter_copy(adapters, tmp_path, "a")
    (a / "adapter_config.json").write_bytes(text)
    for command in [*_both_commands(tiny_llama[0], a, tmp_path / "merged"), ["info", "--model", a]]:
        assert_clear(*cli(capsys, *command), a / "adapter_config.json", needle)


def test_truncated_and_bit_flipped_adapter_weights(adapters, tiny_llama, tmp_path, capsys, record):
    data = (adapters["good"] / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    free = _metadata_span(data, n)
    rng = random.Random(5)
    cases = [("cut", c) for c in (0, 7, 8 + n // 2, len(data) // 2, len(data) - 1)]
    cases += [("cut", rng.randrange(len(data))) for _ in range(trials(4, 100))]
    cases += [("flip", p) for p in (rng.randrange(8 + n) for _ in range(trials(8, 300))) if p not in free]
    bad = []
    for i, (how, pos) in enumerate(cases):
        a = _adapter_copy(adapters, tmp_path, f"a{i}")
        (a / "adapter_model.safetensors").write_bytes(data[:pos] if how == "cut" else flip(data, pos, rng.randrange(8)))
        for command in _both_commands(tiny_llama[0], a, tmp_path / "merged"):
            rc, err = cli(capsys, *command)
            if not is_clear(rc, err, a):
                bad.append((how, pos, rc, err))
        shutil.rmtree(a)
    record(kind="bad file: truncated or bit-flipped adapter", tried=len(cases), failures=len(bad))
    assert not bad, bad[:3]


# ---------------------------------------------------------------- JSONL (finetune, data check, batch)


def _write(path: Path, *lines: str | bytes | dict) -> Path:
    raw = [ln if isinstance(ln, bytes) else (json.dumps(ln) if isinstance(ln, dict) else ln).encode() for ln in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def _data_commands(model: Path, data: Path, out: Path) -> list[list]:
    return [
        ["data", "check", data, "--model", model],
        ["finetune", "--model", model, "--data", data, "--out", out, "--train.max_steps", "1", "-q"],
    ]


JSONL_CASES = {  # name: (lines, what the error line must say)
    "broken line": ([CHAT, '{"messages": [', CHAT], ":2: invalid JSON (Expecting value at column 15)"),
    "non-UTF-8": ([CHAT, CHAT, b'{"text": "caf\xe9"}'], ":3: not UTF-8 text (byte 0xe9 at column 14, file offset"),
    "wrong field type": ([CHAT, {"messages": "hi"}], ":2: 'messages' must be a non-empty list"),
    "number field": ([{"prompt": 1, "completion": "x"}], ":1: field 'prompt' must be a string, got int"),
    "not an object": ([CHAT, "[1, 2]"], ":2: a list, not a JSON object"),
    "NUL bytes": ([CHAT, b"\x00\x00"], ":2: invalid JSON"),
    "deep nesting": ([CHAT, "[" * 100_000], ":2: invalid JSON"),
    "huge number": ([CHAT, "1" * 10_000], ":2: invalid JSON value"),
}


@pytest.mark.parametrize("case", JSONL_CASES)
def test_bad_training_jsonl(tiny_llama, tmp_path, capsys, case):
    lines, needle = JSONL_CASES[case]
    data = _write(tmp_path / "d.jsonl", *lines)
    for command in _data_commands(tiny_llama[0], data, tmp_path / "out"):
        assert_clear(*cli(capsys, *command), data, f"{data}{needle}")
    assert not (tmp_path / "out").exists()


def test_blank_lines_and_bom_are_accepted(tiny_llama, tmp_path, capsys):
    """Decision: blank (or whitespace-only) lines are skipped and a UTF-8 BOM at the start is ignored."""
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n\n   \n\r\n" + json.dumps(CHAT).encode() + b"\n")
    capsys.readouterr()
    rc = main(["data", "check", str(data), "--model", str(tiny_llama[0])])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"{data}: 2 records" in out.out


def test_several_bad_lines_are_listed_one_per_line(tiny_llama, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", CHAT, "{", b"\xff", {"messages": 3})
    rc, err = cli(capsys, "data", "check", data, "--model", tiny_llama[0])
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err and lines[0] == f"slimlm data: error: {data}: 3 problem(s):"
    assert [ln.strip().split(": ")[0] for ln in lines[1:]] == [f"{data}:2", f"{data}:3", f"{data}:4"]


def test_huge_single_line(tiny_llama, tmp_path, capsys, monkeypatch):
    """An over-long line (a missing newline) is refused by number without reading it whole; the next line counts on."""
    import slimlm.jsonl

    monkeypatch.setattr(slimlm.jsonl, "MAX_LINE_BYTES", 2**20)
    data = _write(tmp_path / "d.jsonl", CHAT, json.dumps({"text": "x" * 3 * 2**20}), "{")
    rc, err = cli(capsys, "data", "check", data, "--model", tiny_llama[0])
    assert rc == 2 and "Traceback" not in err
    assert f"{data}:2: longer than 1,048,576 bytes; is a newline missing?" in err and f"{data}:3: invalid JSON" in err
    # under the limit, a long record is data: it is truncated to max_seq_len, not refused
    data = _write(tmp_path / "ok.jsonl", {"text": "the cat sat " * 20_000})
    rc, err = cli(capsys, "data", "check", data, "--model", tiny_llama[0], "--max-seq-len", "32", "--format", "text")
    assert rc == 0, err


def test_missing_or_folder_data_file(tiny_llama, tmp_path, capsys):
    for path in (tmp_path / "nope.jsonl", tmp_path):
        for command in _data_commands(tiny_llama[0], path, tmp_path / "out"):
            rc, err = cli(capsys, *command)
            assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


BATCH_OK = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 1}}
BATCH_CASES = {
    "broken line": ([BATCH_OK, "{bad"], ": line 2: invalid JSON (Expecting property name enclosed in double quotes"),
    "non-UTF-8": ([BATCH_OK, b"\xff\xfe"], ": line 2: not UTF-8 text (byte 0xff at column 1"),
    "wrong types": ([{**BATCH_OK, "custom_id": 5}], ": line 1: custom_id must be a non-empty string"),
    "body not object": ([{**BATCH_OK, "body": []}], ": line 1: body must be a JSON object"),
    "empty": ([""], " holds no requests"),
}


@pytest.mark.parametrize("case", BATCH_CASES)
def test_bad_batch_input(tiny_llama, tmp_path, capsys, case):
    lines, needle = BATCH_CASES[case]
    src = _write(tmp_path / "in.jsonl", *lines)
    assert_clear(*cli(capsys, "batch", "--model", tiny_llama[0], src, tmp_path / "out.jsonl"), src, f"{src}{needle}")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "lines,needle",
    [
        (["{bad"], ":1: invalid JSON (Expecting property name"),
        ([b"\xff"], ":1: not UTF-8 text (byte 0xff at column 1, file offset 0)"),
        ([{"prompt": "x"}], ":1: each JSONL record needs a string 'text' field"),
    ],
)
def test_bad_perplexity_jsonl(tiny_llama, tmp_path, capsys, lines, needle):
    src = _write(tmp_path / "ppl.jsonl", *lines)
    assert_clear(*cli(capsys, "eval", "--model", tiny_llama[0], "--ppl", src), src, f"{src}{needle}")


# ---------------------------------------------------------------- YAML recipes


@pytest.mark.parametrize(
    "text,needle",
    [(b"model: [unclosed", "not valid YAML"), (b"model: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 10)")],
)
def test_bad_recipe_yaml(tmp_path, capsys, text, needle):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    assert_clear(*cli(capsys, "finetune", recipe, "--out", tmp_path / "ft"), recipe, needle)
    assert_clear(*cli(capsys, "compress", recipe, "--out", tmp_path / "c"), recipe, needle)


def test_truncated_teacher_cache(tmp_path):
    """`distill --teacher-cache-path` reads a safetensors file the user may hand over: the same header check."""
    from slimlm.checkpoint import CheckpointError
    from slimlm.train.teacher_cache import read_cache

    p = tmp_path / "teacher.safetensors"
    save_file({"values": torch.zeros(4, 2)}, str(p), metadata={"format": "x"})
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=re.escape(str(p)) + " is corrupt: the file is truncated"):
        read_cache(p)
