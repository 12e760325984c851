import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from explain.trace import Trace, TraceFormatError, Word


def make_trace(steps=3, batch=2, tokens=5, h=4, w=6):
    g = torch.Generator().manual_seed(0)
    att = torch.rand(steps, batch, tokens, h, w, generator=g)
    att = att / att.sum(2, keepdim=True)
    return Trace(
        prompts=["a red circle", "a blue square"][:batch],
        tokens=[["<sot>", "a", "red", "circle", "<eot>"], ["<sot>", "a", "blue", "square", "<eot>"]][:batch],
        words=[[Word("a", [1]), Word("red", [2]), Word("circle", [3])], [Word("a", [1]), Word("blue", [2]), Word("square", [3])]][:batch],
        timesteps=torch.tensor([999.0, 500.0, 1.0][:steps]),
        sigmas=torch.tensor([14.6, 1.0, 0.03][:steps]),
        x_t=torch.randn(steps, batch, 4, h, w, generator=g),
        x0=torch.randn(steps, batch, 4, h, w, generator=g),
        attention=att,
        images=torch.randint(0, 255, (batch, h * 4, w * 4, 3), dtype=torch.uint8, generator=g),
        meta={"model_id": "tiny", "seed": 1, "height": h * 4, "width": w * 4},
    )


def test_round_trip(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "t.safetensors")
    back = Trace.load(path)
    assert back.prompts == trace.prompts
    assert back.words[1][2].text == "square"
    assert torch.equal(back.x_t, trace.x_t)
    assert torch.allclose(back.attention, trace.attention, atol=1e-3)
    assert torch.equal(back.images, trace.images)
    assert back.meta["seed"] == 1
    assert back.image_size == (16, 24)


def test_save_adds_suffix_and_is_atomic(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "run")
    assert path.name == "run.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]


def test_word_lookup_error_lists_words():
    trace = make_trace()
    assert trace.word("RED").token_indices == [2]
    with pytest.raises(KeyError, match="'circle'"):
        trace.word("dog")


def test_check_step():
    trace = make_trace()
    assert trace.check_step(-1) == 2
    with pytest.raises(IndexError, match="0..2"):
        trace.check_step(3)


def test_foreign_safetensors_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(TraceFormatError, match="not a diffusion-explain trace"):
        Trace.load(path)


def test_garbage_file_rejected(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"hello, this is not safetensors")
    with pytest.raises(TraceFormatError, match="not a readable safetensors"):
        Trace.load(path)
    with pytest.raises(TraceFormatError, match="no trace file"):
        Trace.load(tmp_path / "missing.safetensors")


def test_newer_schema_rejected(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["schema_version"] = "99"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(TraceFormatError, match="newer"):
        Trace.load(path)


def test_validate_catches_shape_mismatch():
    trace = make_trace()
    trace.x0 = trace.x0[:, :1]
    with pytest.raises(TraceFormatError, match="x0 shape"):
        trace.validate()


def make_full_trace():
    """`make_trace` plus a negative prompt, one attention layer and a final latent."""
    trace = make_trace()
    g = torch.Generator().manual_seed(1)
    trace.negative_prompts = ["green", "green"]
    trace.negative_tokens = [["<sot>", "green", "<eot>"] for _ in range(2)]
    trace.negative_words = [[Word("green", [1])] for _ in range(2)]
    trace.attention_negative = torch.rand(3, 2, 3, 4, 6, generator=g)
    trace.attention_layers = {"mid": torch.rand(3, 2, 5, 2, 3, generator=g)}
    trace.final_latent = torch.randn(2, 4, 4, 6, generator=g)
    return trace.validate()


def rewrite(path, edit):
    """Rewrite the saved trace at ``path`` after ``edit(tensors, header, metadata)`` changed its parts."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata["trace"])
    edit(tensors, header, metadata)
    metadata["trace"] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)


def test_full_trace_round_trip(tmp_path):
    back = Trace.load(make_full_trace().save(tmp_path / "t.safetensors"))
    assert back.negative_words[1][0].token_indices == [1]
    assert back.attention_layers["mid"].shape == (3, 2, 5, 2, 3) and back.final_latent.shape == (2, 4, 4, 6)


def _no_steps(tensors, header, metadata):
    for k in list(tensors):
        if k not in ("final_latent", "images"):
            tensors[k] = tensors[k][:0]


FILE_DAMAGE = {
    "missing schema": (lambda t, h, m: m.pop("schema_version"), "no trace schema version"),
    "schema 0": (lambda t, h, m: m.update(schema_version="0"), "claims trace schema 0, which diffusion-explain never wrote"),
    "negative schema": (lambda t, h, m: m.update(schema_version="-1"), "claims trace schema -1"),
    "negative word index": (
        lambda t, h, m: h["negative_words"][1][0].update(token_indices=[3]),
        r"negative prompt word 'green' points at token positions \[3\], outside the 3 positions of attention_negative",
    ),
    "negative tokens per item": (
        lambda t, h, m: h.update(negative_tokens=h["negative_tokens"][:1]),
        r"negative_tokens/negative_words must be empty or have one entry per batch item \(2\), got 1 and 2",
    ),
    "negative words per item": (
        lambda t, h, m: h["negative_words"].append([]),
        r"one entry per batch item \(2\), got 2 and 3",
    ),
    "layer token count": (
        lambda t, h, m: t.update({"attention_layers/mid": t["attention_layers/mid"][:, :, :4].contiguous()}),
        "attention layer 'mid' has 4 token positions but attention has 5",
    ),
    "final latent shape": (
        lambda t, h, m: t.update(final_latent=t["final_latent"][..., :5].contiguous()),
        r"final_latent must be one step of x_t \(2, 4, 4, 6\), got \(2, 4, 4, 5\)",
    ),
    "no steps": (_no_steps, "the trace has no steps"),
    "float images": (
        lambda t, h, m: t.update(images=t["images"].float() / 255),
        "images must be uint8 RGB .*got torch.float32",
    ),
}


@pytest.mark.parametrize("damage", FILE_DAMAGE, ids=list(FILE_DAMAGE))
def test_damaged_file_rejected_at_load(tmp_path, damage):
    edit, message = FILE_DAMAGE[damage]
    path = make_full_trace().save(tmp_path / "t.safetensors")
    rewrite(path, edit)
    with pytest.raises(ValueError, match=message):
        Trace.load(path)


def _set(name, value):
    return lambda trace: setattr(trace, name, value(trace))


OBJECT_DAMAGE = {
    "negative word index": (
        lambda tr: tr.negative_words[0][0].token_indices.append(7),
        r"negative prompt word 'green' points at token positions \[1, 7\]",
    ),
    "negative tokens per item": (_set("negative_tokens", lambda tr: tr.negative_tokens * 2), "got 4 and 2"),
    "layer token count": (
        lambda tr: tr.attention_layers.update(mid=tr.attention_layers["mid"][:, :, :3]),
        "attention layer 'mid' has 3 token positions but attention has 5",
    ),
    "final latent shape": (_set("final_latent", lambda tr: tr.final_latent[:1]), "final_latent must be one step of x_t"),
    "no steps": (
        lambda tr: [setattr(tr, k, getattr(tr, k)[:0]) for k in ("timesteps", "sigmas", "x_t", "x0")],
        "the trace has no steps",
    ),
    "float images": (_set("images", lambda tr: tr.images.float()), "images must be uint8"),
    "float previews": (
        _set("x0_previews", lambda tr: torch.rand(3, 2, 8, 8, 3)),
        "x0_previews must be uint8 RGB",
    ),
}


@pytest.mark.parametrize("damage", OBJECT_DAMAGE, ids=list(OBJECT_DAMAGE))
def test_damaged_trace_rejected_by_validate_and_save(tmp_path, damage):
    corrupt, message = OBJECT_DAMAGE[damage]
    trace = make_full_trace()
    corrupt(trace)
    with pytest.raises(ValueError, match=message):
        trace.validate()
    with pytest.raises(ValueError, match=message):
        trace.save(tmp_path / "t.safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- hostile files
# A trace from someone else is untrusted input: every damaged or edited part must end in a
# TraceFormatError that says what is wrong, never another exception (issue 17).
def parts(path):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(metadata["trace"]), metadata


def _header_text(text):
    def edit(t, h, m):
        m["trace"] = text
    return edit


def _deep(levels, inner="0"):
    return "[" * levels + inner + "]" * levels


def _meta(**changes):
    return lambda t, h, m: h["meta"].update(changes)


def _tensor(name, fn):
    return lambda t, h, m: t.update({name: fn(t[name]).contiguous()})


def _poison(name, value, index=0):
    def fn(x):
        x = x.clone()
        x.view(-1)[index] = value
        return x
    return _tensor(name, fn)


HOSTILE_FILES = {
    # the header's JSON
    "header nested 200,000 levels": (_header_text(_deep(200_000)), "nested 200000 levels deep; a trace header nests at most 32"),
    "meta nested 40 levels": (_header_text(json.dumps({"prompts": [], "tokens": [], "words": [], "meta": {"x": json.loads(_deep(40))}})), "nested 42 levels deep"),
    "brackets inside strings do not count": (lambda t, h, m: h["meta"].update(note="[" * 100), None),
    "header is not JSON": (_header_text('{"prompts": ['), "damaged trace header"),
    "header is a list": (_header_text("[1, 2]"), "must be a JSON object, got a list of 2"),
    "header lacks words": (lambda t, h, m: h.pop("words"), "it has no 'words'"),
    "bare NaN in meta": (_header_text('{"prompts": [], "tokens": [], "words": [], "meta": {"guidance": NaN}}'), "holds NaN, which is not a number JSON allows"),
    "Infinity in meta": (_header_text('{"prompts": [], "tokens": [], "words": [], "meta": {"g": -Infinity}}'), "holds -Infinity"),
    "1e999 in meta": (_header_text('{"prompts": [], "tokens": [], "words": [], "meta": {"g": 1e999}}'), "holds 1e999, which overflows to inf"),
    "5000-digit number": (_header_text('{"prompts": [], "tokens": [], "words": [], "meta": {"g": ' + "9" * 5000 + "}}"), "damaged trace header"),
    "no trace header": (lambda t, h, m: m.pop("trace"), "has no trace header"),
    "unreadable schema": (lambda t, h, m: m.update(schema_version="one"), "unreadable schema version"),
    # text fields
    "prompts as a string": (lambda t, h, m: h.update(prompts="a red circle"), "prompts must be a list of strings, got str 'a red circle'"),
    "prompt as a number": (lambda t, h, m: h.update(prompts=[1, "x"]), "prompts must be a list of strings, got a list of 2 holding int 1"),
    "tokens as ints": (lambda t, h, m: h.update(tokens=[[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]), r"tokens\[0\] must be a list of strings, got a list of 5 holding int 0"),
    "tokens as a string": (lambda t, h, m: h.update(tokens="abc"), "tokens must be a list with one list of token strings"),
    "word text as a number": (lambda t, h, m: h["words"][0][0].update(text=5), "a word must be"),
    "word as a string": (lambda t, h, m: h["words"][0].__setitem__(0, "red"), "a word must be"),
    "token index as a bool": (lambda t, h, m: h["words"][0][0].update(token_indices=[True]), "must list its token positions as whole numbers"),
    "token index as a string": (lambda t, h, m: h["words"][0][0].update(token_indices=["1"]), "must list its token positions as whole numbers"),
    "token index as a float": (lambda t, h, m: h["words"][0][0].update(token_indices=[1.5]), "must list its token positions as whole numbers"),
    "negative prompts as a string": (lambda t, h, m: h.update(negative_prompts="green"), "negative_prompts must be a list of strings"),
    "meta as a list": (lambda t, h, m: h.update(meta=[1]), "meta must be a JSON object"),
    "notes as a string": (_meta(notes="careful"), "meta notes must be a list of strings"),
    "model as a number": (_meta(model=3), "meta model must be a string"),
    # sizes in meta (they drive every picture's size)
    "height -64": (_meta(height=-64), "meta height must be a whole number of at least 1, got -64"),
    "height 0": (_meta(height=0), "meta height must be a whole number of at least 1, got 0"),
    "height as a string": (_meta(height="64"), "meta height must be a whole number of at least 1, got '64'"),
    "height as a bool": (_meta(height=True), "meta height must be a whole number"),
    "height 4000 on a 4x6 latent": (_meta(height=4000, width=4000), r"meta says the image is 4000x4000 px, which is not the 6x4 latent times one VAE factor"),
    "16000 px with the VAE factor": (_meta(height=16000, width=24000, vae_scale_factor=8), r"the latent is 6x4 with VAE factor 8, which makes 48x32 px"),
    "height without width": (lambda t, h, m: h["meta"].pop("width"), "meta has a height but no width"),
    "VAE factor 1000": (_meta(height=4000, width=6000, vae_scale_factor=1000), "meta vae_scale_factor is 1000; VAE factors go from 1 to 32"),
    "VAE factor 0": (_meta(vae_scale_factor=0), "meta vae_scale_factor must be a whole number of at least 1"),
    "steps as a float": (_meta(steps=2.5), "meta steps must be a whole number"),
    "seed as a float": (_meta(seed=1.5), "meta seed must be a whole number"),
    "guidance as text": (_meta(guidance="7.5"), "meta guidance must be a number"),
    "latent scale 0": (_meta(latent_scale_factor=0.0), "latent_scale_factor is 0"),
    # tensor values and dtypes
    "NaN latent": (_poison("x_t", float("nan")), "x_t holds 1 NaN or infinite value; a trace holds finite numbers only"),
    "Inf x0": (_poison("x0", float("inf"), 5), "x0 holds 1 NaN or infinite value"),
    "NaN attention": (_poison("attention", float("nan"), 7), "attention holds 1 NaN"),
    "Inf negative attention": (_poison("attention_negative", float("-inf")), "attention_negative holds 1 NaN"),
    "NaN layer": (_poison("attention_layers/mid", float("nan")), "attention layer 'mid' holds 1 NaN"),
    "Inf sigma": (_poison("sigmas", float("inf"), 1), "sigmas holds 1 NaN"),
    "NaN timestep": (_poison("timesteps", float("nan"), 2), "timesteps holds 1 NaN"),
    "NaN final latent": (_poison("final_latent", float("nan")), "final_latent holds 1 NaN"),
    "bool x_t": (_tensor("x_t", lambda x: x > 0), "x_t must hold floating-point numbers .*got torch.bool"),
    "integer x_t": (_tensor("x_t", lambda x: x.round().to(torch.int64)), "x_t must hold floating-point numbers .*got torch.int64"),
    "integer attention": (_tensor("attention", lambda x: x.to(torch.int32)), "attention must hold floating-point numbers"),
    "bool timesteps": (_tensor("timesteps", lambda x: x > 0), "timesteps must hold floating-point or whole numbers, got torch.bool"),
    "float8 x0": (_tensor("x0", lambda x: x.to(torch.float8_e4m3fn)), "x0 must hold floating-point numbers .*got torch.float8_e4m3fn"),
    "bool images": (_tensor("images", lambda x: x > 0), "images must be uint8 RGB"),
    # shapes and sizes of tensors
    "zero-channel latent": (lambda t, h, m: [t.update({k: t[k][:, :, :0].contiguous()}) for k in ("x_t", "x0")] and t.pop("final_latent"), r"has 0 channels; a trace holds 1 to 1024"),
    "zero-width latent": (lambda t, h, m: [t.update({k: t[k][..., :0].contiguous()}) for k in ("x_t", "x0", "attention", "attention_negative")], "has 0 latent columns"),
    "zero-token attention": (lambda t, h, m: t.update(attention=t["attention"][:, :, :0].contiguous()), "attention has 0 token positions; a trace holds 1 to 4096"),
    "missing x0": (lambda t, h, m: t.pop("x0"), "lacks the tensor 'x0'"),
    "2-D x_t": (_tensor("x_t", lambda x: x.reshape(-1, 6)), r"x_t must be \[steps, batch, channels, h, w\]"),
    "images 100 times the latent": (_tensor("images", lambda x: torch.zeros(2, 400, 24, 3, dtype=torch.uint8)), r"images are 24x400 px; for a 6x4 latent they must be 1 to 192x128 px"),
    "zero-size previews": (lambda t, h, m: t.update(x0_previews=torch.zeros(3, 2, 0, 4, 3, dtype=torch.uint8)), "x0_previews are 4x0 px"),
    "empty layer name": (lambda t, h, m: t.update({"attention_layers/": t["attention_layers/mid"].clone()}), "attention layer names must be non-empty strings"),
}


@pytest.mark.parametrize("case", HOSTILE_FILES, ids=list(HOSTILE_FILES))
def test_hostile_file_gives_a_clear_trace_format_error(tmp_path, case):
    edit, message = HOSTILE_FILES[case]
    path = make_full_trace().save(tmp_path / "t.safetensors")
    tensors, header, metadata = parts(path)
    original = metadata["trace"]
    edit(tensors, header, metadata)
    if metadata.get("trace") == original:  # the edit changed the parsed header, not the text
        metadata["trace"] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)
    if message is None:
        Trace.load(path)
        return
    with pytest.raises(TraceFormatError, match=message) as caught:
        Trace.load(path)
    assert type(caught.value) is TraceFormatError
    assert str(caught.value).startswith("t.safetensors"), "the error names the file"


def test_file_level_limits_are_checked_before_parsing(tmp_path, monkeypatch):
    import explain.trace as trace_module

    path = make_full_trace().save(tmp_path / "t.safetensors")
    size = path.stat().st_size
    with pytest.raises(TraceFormatError, match=r"t.safetensors is 0.0 MiB, more than the 0.0 MiB accepted here"):
        Trace.load(path, max_bytes=size - 1)
    assert Trace.load(path, max_bytes=size).num_steps == 3
    monkeypatch.setattr(trace_module, "MAX_HEADER_BYTES", 256)
    with pytest.raises(TraceFormatError, match=r"header; a trace's header is at most 0.0 MiB, so this is not a trace diffusion-explain wrote"):
        Trace.load(path)
    monkeypatch.undo()
    layered = make_full_trace()
    layered.attention_layers.update({f"l{i}": layered.attention_layers["mid"] for i in range(3)})
    layered.save(path)
    monkeypatch.setattr(trace_module, "MAX_LAYERS", 1)
    with pytest.raises(TraceFormatError, match="holds 12 trace tensors; a trace holds at most 11"):
        Trace.load(path)
    monkeypatch.setattr(trace_module, "MAX_LAYERS", 3)
    with pytest.raises(TraceFormatError, match="the trace has 4 attention layers; a trace holds at most 3"):
        Trace.load(path)
    for data, message in ((b"", "has only 0 bytes"), (b"\x01\x02\x03", "has only 3 bytes"),
                          ((10**6).to_bytes(8, "little") + b"{}", "its header would need 1000000 bytes; the file has 10")):
        (tmp_path / "bad.safetensors").write_bytes(data)
        with pytest.raises(TraceFormatError, match=message):
            Trace.load(tmp_path / "bad.safetensors")


def test_a_latent_larger_than_the_bounds_is_refused():
    trace = make_trace(steps=1, batch=1, tokens=5, h=513, w=1)
    trace.images = None
    trace.meta = {}
    with pytest.raises(TraceFormatError, match=r"has 513 latent rows; a trace holds 1 to 512"):
        trace.validate()
    wide = make_trace(steps=1, batch=1, h=2, w=2)
    wide.meta = {"height": 4096 * 2, "width": 4096 * 2}
    wide.images = None
    with pytest.raises(TraceFormatError, match="not the 2x2 latent times one VAE factor"):
        wide.validate()
    big = make_trace(steps=1, batch=1, h=512, w=1)
    big.images, big.meta = None, {"vae_scale_factor": 16}
    with pytest.raises(TraceFormatError, match=r"describes a 16x8192 px image; a trace describes images of 1 to 4096 px a side"):
        big.validate()


OBJECT_HOSTILE = {
    "prompts as a string": (_set("prompts", lambda tr: "a red circle"), "prompts must be a list of strings, got str"),
    "tokens as ints": (_set("tokens", lambda tr: [[1, 2, 3, 4, 5]] * 2), r"tokens\[0\] must be a list of strings"),
    "word with a bool index": (lambda tr: tr.words[0].append(Word("x", [True])), "words must hold words"),
    "NaN latent": (lambda tr: tr.x_t.view(-1).__setitem__(3, float("nan")), "x_t holds 1 NaN"),
    "bool x_t": (_set("x_t", lambda tr: tr.x_t > 0), "x_t must hold floating-point numbers"),
    "numpy x0": (_set("x0", lambda tr: tr.x0.numpy()), "x0 must be a tensor, got ndarray"),
    "NaN in meta": (lambda tr: tr.meta.update(extra={"score": float("nan")}), r"meta.extra.score is nan; numbers in a trace are finite"),
    "meta nested 100 levels": (lambda tr: tr.meta.update(deep=json.loads(_deep(100))), "is nested more than 32 levels deep"),
    "meta key not a string": (lambda tr: tr.meta.update({3: "x"}), "has a key 3 that is not a string"),
    "meta not a dict": (_set("meta", lambda tr: [("height", 16)]), "meta must be a JSON object"),
    "layers not a dict": (_set("attention_layers", lambda tr: [1]), "attention_layers must map layer names to tensors"),
    "meta object": (lambda tr: tr.meta.update(thing=object()), "cannot be stored as JSON"),
}


@pytest.mark.parametrize("case", OBJECT_HOSTILE, ids=list(OBJECT_HOSTILE))
def test_hostile_trace_object_is_refused_by_save_with_a_trace_format_error(tmp_path, case):
    corrupt, message = OBJECT_HOSTILE[case]
    trace = make_full_trace()
    corrupt(trace)
    with pytest.raises(TraceFormatError, match=message):
        trace.save(tmp_path / "t.safetensors")
    assert not list(tmp_path.iterdir()), "nothing is left behind"


def test_saving_is_deterministic(tmp_path):
    trace = make_full_trace()
    trace.meta.update(zeta=1, alpha={"b": 2, "a": [1, 2]}, model="tiny")
    first = trace.save(tmp_path / "a.safetensors").read_bytes()
    for name in ("b", "c", "d"):
        assert trace.save(tmp_path / f"{name}.safetensors").read_bytes() == first
    shuffled = make_full_trace()
    shuffled.meta = dict(reversed(list(trace.meta.items())))  # same content, another insertion order
    assert shuffled.save(tmp_path / "e.safetensors").read_bytes() == first
    # a trace loaded and saved again is the same file (the attention was already fp16)
    again = Trace.load(tmp_path / "a.safetensors").save(tmp_path / "f.safetensors").read_bytes()
    assert again == first


def test_saving_is_deterministic_across_processes(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; from tests.explain.test_trace import make_full_trace; "
        "make_full_trace().save(sys.argv[1])"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_the_deterministic_writer_is_plain_safetensors(tmp_path):
    trace = make_full_trace()
    path = trace.save(tmp_path / "t.safetensors", attention_dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "diffusion-explain/trace"
        assert f.get_tensor("attention").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("x_t"), trace.x_t) and torch.equal(f.get_tensor("images"), trace.images)
        assert f.get_tensor("timesteps").dtype == torch.float64
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0, "the data starts 8-byte aligned"


@pytest.mark.parametrize(
    "source, shared",
    [
        ("/home/ana/models/sd15", "sd15"),
        ("/home/ana/models/sd15/", "sd15"),
        ("~/models/my-sdxl", "my-sdxl"),
        ("./checkpoints/run-3", "run-3"),
        ("../run-3", "run-3"),
        ("C:\\Users\\ana\\models\\sd15", "sd15"),
        ("\\\\server\\share\\models\\flux", "flux"),
        ("file:///srv/models/sd21", "sd21"),
        ("data/models/sd15", "sd15"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("embedded (shapes-64)", "embedded (shapes-64)"),
        ("tiny (random weights, test only)", "tiny (random weights, test only)"),
    ],
)
def test_model_names_are_shared_not_paths(source, shared):
    from explain.trace import shareable_model_name

    assert shareable_model_name(source) == shared


def test_a_saved_trace_holds_no_local_model_path(tmp_path):
    trace = make_full_trace()
    trace.meta.update(model="/home/ana/secret-models/sd15", model_source="/home/ana/secret-models/sd15", vae_path="/home/ana/vae")
    path = trace.save(tmp_path / "t.safetensors")
    assert b"/home/ana" not in path.read_bytes() and b"secret-models" not in path.read_bytes()
    back = Trace.load(path)
    assert back.meta["model"] == "sd15" and back.meta["model_source"] == "sd15" and back.meta["vae_path"] == "vae"
    assert trace.meta["model"] == "/home/ana/secret-models/sd15", "saving does not change the caller's trace"


def test_an_old_trace_with_a_model_path_loses_it_when_loaded_and_saved_again(tmp_path):
    # traces written before issue 17 carried the absolute folder in meta
    path = make_full_trace().save(tmp_path / "old.safetensors")
    tensors, header, metadata = parts(path)
    header["meta"].update(model_source="/root/models/sd15", model="/root/models/sd15")
    metadata["trace"] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)
    old = Trace.load(path)
    assert old.meta["model_source"] == "sd15" and old.meta["model"] == "sd15"
    assert b"/root/models" not in old.save(tmp_path / "new.safetensors").read_bytes()


def test_the_tap_and_the_loader_record_a_local_models_folder_name(tmp_path):
    from explain.adapters.diffusers import generate
    from explain.adapters.diffusers.loading import load_model
    from explain.testing import tiny_sd_pipeline

    folder = tmp_path / "private" / "my-model"
    tiny_sd_pipeline().save_pretrained(str(folder))
    pipe, name = load_model(str(folder), device="cpu", dtype="float32", announce=lambda m: None)
    assert name == "my-model"
    assert str(tmp_path) in str(pipe.name_or_path), "diffusers keeps the folder; the tap must not"
    trace, _ = generate(pipe, "a red circle", steps=1, guidance=2.0, previews=False)
    assert trace.meta["model"] == "my-model"
    assert str(tmp_path).encode() not in trace.save(tmp_path / "t.safetensors").read_bytes()
