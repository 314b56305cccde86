"""The safetensors reader and config.json parsing: round trips against files
written by the official safetensors library (and bf16 written by hand), and
every malformed input turned into a RefqError that names the file and tensor."""
import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import (bf16_bits_to_f32, f32_to_bf16_bits, write_safetensors_by_hand,
                      write_tiny_checkpoint)
from llama_np import Checkpoint, LlamaConfig, load_model
from llama_np.checkpoint import SafetensorsFile
from refq.errors import RefqError


def _arrays():
    rng = np.random.default_rng(0)
    a = {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((4, 7)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "i64": rng.integers(-2**40, 2**40, size=(6,)),
        "i32": rng.integers(-2**30, 2**30, size=(2, 2)).astype(np.int32),
        "i16": rng.integers(-2**15, 2**15, size=(5,)).astype(np.int16),
        "i8": rng.integers(-128, 128, size=(3, 3)).astype(np.int8),
        "u8": rng.integers(0, 256, size=(9,)).astype(np.uint8),
        "u16": rng.integers(0, 2**16, size=(4,)).astype(np.uint16),
        "u32": rng.integers(0, 2**32, size=(4,)).astype(np.uint32),
        "u64": rng.integers(0, 2**63, size=(2,)).astype(np.uint64),
        "bool": rng.integers(0, 2, size=(7,)).astype(np.bool_),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    return a


def test_round_trip_all_dtypes_vs_safetensors_library(tmp_path):
    arrays = _arrays()
    path = str(tmp_path / "model.safetensors")
    save_file(arrays, path, metadata={"format": "pt"})
    ck = Checkpoint(str(tmp_path))
    assert sorted(ck.names()) == sorted(arrays)
    for name, want in arrays.items():
        got = ck.raw(name)
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        if want.dtype.kind == "f":
            g = ck.get(name)
            assert g.dtype == np.float32
            np.testing.assert_array_equal(g, want.astype(np.float32), err_msg=name)
        else:
            with pytest.raises(RefqError, match=name):
                ck.get(name)
    assert SafetensorsFile(path).metadata == {"format": "pt"}


def test_bf16_bits_by_hand(tmp_path):
    # hand-checked bit patterns: 1.0 = 0x3F80, -2.0 = 0xC000, 0.15625 = 0x3E20,
    # 1 + 2^-7 = 0x3F81 exactly; 1 + 2^-8 is a tie -> even 0x3F80; 1 + 3·2^-9 -> 0x3F81
    vals = np.array([1.0, -2.0, 0.15625, 1 + 2**-7, 1 + 2**-8, 1 + 3 * 2**-9, 0.0],
                    dtype=np.float32)
    bits = f32_to_bf16_bits(vals)
    assert [hex(b) for b in bits] == ["0x3f80", "0xc000", "0x3e20", "0x3f81", "0x3f80",
                                      "0x3f81", "0x0"]
    write_safetensors_by_hand(str(tmp_path / "model.safetensors"),
                              {"w": ("BF16", bits.reshape(7, 1)),
                               "x": ("F32", np.arange(3, dtype=np.float32))})
    ck = Checkpoint(str(tmp_path))
    got = ck.get("w", shape=(7, 1))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[:, 0], [1.0, -2.0, 0.15625, 1 + 2**-7, 1.0,
                                              1 + 2**-7, 0.0])
    np.testing.assert_array_equal(ck.raw("w")[:, 0], bits)
    np.testing.assert_array_equal(ck.get("x"), [0, 1, 2])
    np.testing.assert_array_equal(bf16_bits_to_f32(bits), got[:, 0])


def test_fp32_is_zero_copy_view(tmp_path):
    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    g = Checkpoint(str(tmp_path)).get("w")
    assert not g.flags.writeable or isinstance(g.base, np.ndarray)   # a view on the map


def test_only_empty_tensor(tmp_path):
    save_file({"e": np.zeros((0,), np.float32)}, str(tmp_path / "model.safetensors"))
    assert Checkpoint(str(tmp_path)).get("e").shape == (0,)


# --------------------------------------------------------------------------- bad files
def _layout(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def test_truncated_file_names_file_and_tensor(tmp_path):
    arrays = {"a.weight": np.ones((8, 8), np.float32), "b.weight": np.ones((16, 8), np.float32)}
    path = str(tmp_path / "model.safetensors")
    save_file(arrays, path)
    start, header = _layout(path)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])   # the tensor at the end
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(RefqError) as e:
        Checkpoint(str(tmp_path)).get(last)
    msg = str(e.value)
    assert path in msg and repr(last) in msg and "truncated" in msg


def test_file_shorter_than_header_length(tmp_path):
    path = str(tmp_path / "model.safetensors")
    with open(path, "wb") as f:
        f.write(b"\x01\x02\x03")
    with pytest.raises(RefqError, match="model.safetensors"):
        Checkpoint(str(tmp_path))


def test_corrupt_header_length(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": np.ones(4, np.float32)}, path)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**60))
    with pytest.raises(RefqError) as e:
        Checkpoint(str(tmp_path))
    assert path in str(e.value) and "header length" in str(e.value)


def test_header_not_json(tmp_path):
    path = str(tmp_path / "model.safetensors")
    body = b"{not json at all\xff\xfe" + b" " * 6
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + b"\0" * 16)
    with pytest.raises(RefqError) as e:
        Checkpoint(str(tmp_path))
    assert path in str(e.value) and "JSON" in str(e.value)


def test_header_entry_bad(tmp_path):
    path = str(tmp_path / "model.safetensors")
    write_safetensors_by_hand(path, {"w": ("F32", np.ones(4, np.float32))})
    # an unknown dtype named in the header
    raw = open(path, "rb").read().replace(b'"F32"', b'"F99"')
    open(path, "wb").write(raw)
    with pytest.raises(RefqError) as e:
        Checkpoint(str(tmp_path))
    assert path in str(e.value) and "'w'" in str(e.value) and "F99" in str(e.value)


def test_missing_tensor_named(tmp_path):
    save_file({"w": np.ones(4, np.float32)}, str(tmp_path / "model.safetensors"))
    ck = Checkpoint(str(tmp_path))
    assert "w" in ck and "nope.weight" not in ck
    with pytest.raises(RefqError, match="nope.weight"):
        ck.get("nope.weight")
    with pytest.raises(RefqError, match="nope.weight"):
        ck.raw("nope.weight")


def test_wrong_shape_named(tmp_path):
    save_file({"w": np.ones((4, 3), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RefqError) as e:
        Checkpoint(str(tmp_path)).get("w", shape=(3, 4))
    msg = str(e.value)
    assert "'w'" in msg and "(4, 3)" in msg and "(3, 4)" in msg


def test_model_with_missing_and_misshapen_tensor(tmp_path):
    from safetensors.numpy import load_file
    folder = str(tmp_path / "m")
    write_tiny_checkpoint(folder)
    path = os.path.join(folder, "model.safetensors")
    t = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    t[name] = t[name][:, :-1].copy()                      # (48, 31) instead of (48, 32)
    save_file(t, path)
    with pytest.raises(RefqError) as e:
        load_model(folder)
    assert name in str(e.value) and "(48, 31)" in str(e.value) and "(48, 32)" in str(e.value)
    del t[name]
    save_file(t, path)
    with pytest.raises(RefqError, match=name.replace(".", r"\.")):
        load_model(folder)


def test_no_safetensors_file(tmp_path):
    with pytest.raises(RefqError, match="safetensors"):
        Checkpoint(str(tmp_path))


def test_index_missing_shard(tmp_path):
    folder = str(tmp_path / "m")
    write_tiny_checkpoint(folder, shards=2)
    shard = os.path.join(folder, "model-00002-of-00002.safetensors")
    os.remove(shard)
    with pytest.raises(RefqError) as e:
        Checkpoint(folder)
    assert "model-00002-of-00002.safetensors" in str(e.value)
    assert "index.json" in str(e.value)


def test_index_lists_tensor_not_in_shard(tmp_path):
    folder = str(tmp_path / "m")
    write_tiny_checkpoint(folder, shards=2)
    ipath = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(ipath))
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    json.dump(index, open(ipath, "w"))
    ck = Checkpoint(folder)
    with pytest.raises(RefqError, match="ghost.weight"):
        ck.get("ghost.weight")


def test_index_not_json(tmp_path):
    folder = str(tmp_path / "m")
    write_tiny_checkpoint(folder, shards=2)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write("{oops")
    with pytest.raises(RefqError, match="index.json"):
        Checkpoint(folder)


# --------------------------------------------------------------------------- config.json
def _cfg(tmp_path, **edit):
    folder = str(tmp_path / "m")
    write_tiny_checkpoint(folder, tokenizer=False)
    path = os.path.join(folder, "config.json")
    d = json.load(open(path))
    for k, v in edit.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    json.dump(d, open(path, "w"))
    return folder, path


def test_config_values(tmp_path):
    folder, _ = _cfg(tmp_path, rope_theta=None,
                     rope_parameters={"rope_theta": 1234.0, "rope_type": "default"})
    c = LlamaConfig.load(folder)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 4, 2, 8)
    assert c.rope_theta == 1234.0 and c.rope_scaling is None
    assert c.tie_word_embeddings is True and c.attention_bias is False


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads"])
def test_config_missing_key(tmp_path, key):
    folder, path = _cfg(tmp_path, **{key: None})
    with pytest.raises(RefqError) as e:
        LlamaConfig.load(folder)
    assert "config.json" in str(e.value) and key in str(e.value)


def test_config_unsupported_model_type(tmp_path):
    folder, path = _cfg(tmp_path, model_type="gpt2")
    with pytest.raises(RefqError) as e:
        LlamaConfig.load(folder)
    assert path in str(e.value) and "gpt2" in str(e.value) and "model_type" in str(e.value)


@pytest.mark.parametrize("scaling", [{"type": "yarn", "factor": 4.0},
                                     {"rope_type": "dynamic", "factor": 2.0}])
def test_config_unsupported_rope_scaling(tmp_path, scaling):
    folder, path = _cfg(tmp_path, rope_scaling=scaling)
    with pytest.raises(RefqError) as e:
        LlamaConfig.load(folder)
    kind = scaling.get("type") or scaling.get("rope_type")
    assert path in str(e.value) and "rope_scaling" in str(e.value) and kind in str(e.value)


def test_config_rope_scaling_without_factor(tmp_path):
    folder, path = _cfg(tmp_path, rope_scaling={"rope_type": "linear"})
    with pytest.raises(RefqError) as e:
        load_model(folder)
    assert "config.json" in str(e.value) and "factor" in str(e.value)


def test_config_invalid_json(tmp_path):
    folder, path = _cfg(tmp_path)
    with open(path, "w") as f:
        f.write('{"model_type": "llama",')
    with pytest.raises(RefqError) as e:
        LlamaConfig.load(folder)
    assert path in str(e.value) and "JSON" in str(e.value)


def test_config_missing_file(tmp_path):
    with pytest.raises(RefqError, match="config.json"):
        LlamaConfig.load(str(tmp_path))


def test_config_bad_heads(tmp_path):
    folder, path = _cfg(tmp_path, num_key_value_heads=3)
    with pytest.raises(RefqError) as e:
        LlamaConfig.load(folder)
    assert "num_key_value_heads" in str(e.value)
