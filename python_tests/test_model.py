"""The whole model against transformers on tiny random checkpoints in every layout: logits and greedy tokens.

Oracles: transformers' LlavaForConditionalGeneration (no lm_head bias) for the llava_hf layout; for the layouts
that store an lm_head bias, a PhiForCausalLM (whose lm_head has a bias) fed the same spliced embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import phi_fast
from phi_fast.image import preprocess
from phi_fast.kv_cache import PagePool, SequencePages
from phi_fast.model import StepBatch
from phi_fast.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from checkpoints import IMAGE_TOKEN_ID, make_tiny_checkpoints
from tokenizer_fixture import write_tokenizer

LAYOUT_VARIANTS = ["llava_hf", "llava_hf_sharded", "llava_phi", "llava_phi_sharded", "hf_phi", "mixformer"]


@pytest.fixture(scope="module", params=[80, 64], ids=["head_dim80", "head_dim64"])
def tiny(request, tmp_path_factory):
    variants = tuple(LAYOUT_VARIANTS) if request.param == 80 else ("llava_hf", "llava_phi")
    t = make_tiny_checkpoints(tmp_path_factory.mktemp(f"tiny{request.param}"), head_dim=request.param,
                              variants=variants)
    for folder in t.paths.values():
        write_tokenizer(folder)
    return t


def _image(seed: int, size: tuple[int, int] = (70, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _hf_ids(ids: list[int], n_image: int) -> torch.Tensor:
    out: list[int] = []
    for t in ids:
        out.extend([IMAGE_TOKEN_ID] * n_image if t == IMAGE_TOKEN_INDEX else [t])
    return torch.tensor([out])


class Oracle:
    """transformers' forward over a growing sequence (no cache: every step is a full forward)."""

    def __init__(self, tiny, bias: bool, ids: list[int], pixels: torch.Tensor, n_image: int):
        self.tiny, self.bias = tiny, bias
        self.ids = _hf_ids(ids, n_image)
        self.pixels = pixels[None]
        captured = {}
        hook = tiny.llava.model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: captured.update(kwargs), with_kwargs=True)
        with torch.no_grad():
            self.llava_logits = tiny.llava(input_ids=self.ids, pixel_values=self.pixels).logits[0]
        hook.remove()
        self.embeds = captured["inputs_embeds"]  # [1, T, C], image rows spliced in

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """[T, V] logits of the current sequence."""
        if not self.bias:
            return self.tiny.llava(input_ids=self.ids, pixel_values=self.pixels).logits[0]
        return self.tiny.phi(inputs_embeds=self.embeds).logits[0]

    def append(self, token: int) -> None:
        t = torch.tensor([[token]])
        self.ids = torch.cat([self.ids, t], dim=1)
        self.embeds = torch.cat([self.embeds, self.tiny.phi.model.embed_tokens(t)], dim=1)


def _prompt(model: phi_fast.Model, question: str, image_seed: int = 0) -> tuple[list[int], torch.Tensor]:
    ids = tokenize_prompt(model.tokenizer, build_prompt(question, with_image=True))
    px = preprocess(_image(image_seed), image_size=model.config.vision.image_size,
                    pad_to_square=model.config.pad_to_square)
    return ids, px


def _prefill_logits(model: phi_fast.Model, ids: list[int], px: torch.Tensor) -> torch.Tensor:
    """Our [T, V] logits of the whole prompt, through the paged cache."""
    llava, t = model.llava, model.config.text
    embeds = llava.embed_prompt(ids, px[None])
    n = embeds.shape[0]
    pool = PagePool(num_layers=t.num_layers, num_heads=t.num_heads, head_dim=t.head_dim, num_pages=n // 16 + 1)
    seq = SequencePages()
    slots = seq.reserve(pool, n)
    batch = StepBatch(positions=torch.arange(n), slot_mapping=torch.tensor(slots),
                      block_table=torch.tensor([seq.pages], dtype=torch.int32),
                      seq_lens=torch.tensor([n], dtype=torch.int32),
                      cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), no_prefix=True)
    return llava.forward(embeds, batch, pool, all_logits=True)


@pytest.mark.parametrize("variant", LAYOUT_VARIANTS)
def test_logits_match_transformers(tiny, variant):
    if variant not in tiny.paths:
        pytest.skip("variant built for head_dim 80 only")
    model = phi_fast.load(tiny.paths[variant], progress=False)
    ids, px = _prompt(model, "What is shown here?")
    bias = model.config.lm_head_bias
    assert bias == (tiny.layout[variant] != "llava_hf")
    oracle = Oracle(tiny, bias, ids, px, model.llava.image_tokens)
    ours = _prefill_logits(model, ids, px)
    expected = oracle.logits()
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    if bias:  # the bias matters: Llava's logits (no bias) must differ by exactly it
        torch.testing.assert_close(ours - tiny.lm_head_bias, oracle.llava_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["llava_hf", "llava_phi", "hf_phi", "mixformer"])
def test_greedy_tokens_match_transformers(tiny, variant):
    if variant not in tiny.paths:
        pytest.skip("variant built for head_dim 80 only")
    model = phi_fast.load(tiny.paths[variant], progress=False)
    ids, px = _prompt(model, "Describe the picture in detail.", image_seed=1)
    req = model.engine.add(ids, [px], SamplingParams(max_new_tokens=32, ignore_eos=True))
    model.engine.run()
    oracle = Oracle(tiny, model.config.lm_head_bias, ids, px, model.llava.image_tokens)
    expected = []
    for _ in range(32):
        token = int(oracle.logits()[-1].argmax())
        expected.append(token)
        oracle.append(token)
    assert req.output_ids == expected
    assert len(set(expected)) > 4, "a degenerate (repetitive) continuation would make a weak test"


def test_generate_api_is_deterministic_and_streams_the_same_text(tiny):
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    image = _image(2)
    a = model.generate(image, "What is this?", max_new_tokens=24)
    b = model.generate(image, "What is this?", max_new_tokens=24)
    streamed = "".join(model.generate(image, "What is this?", max_new_tokens=24, stream=True))
    assert a == b == streamed
    assert a == a.strip()


def test_text_only_turn_has_no_image_rows(tiny):
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    ids = tokenize_prompt(model.tokenizer, build_prompt("Hello there", with_image=False))
    assert IMAGE_TOKEN_INDEX not in ids
    assert isinstance(model.generate(None, "Hello there", max_new_tokens=8), str)


def test_sampling_is_reproducible_with_a_seed(tiny):
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    image = _image(3)
    runs = [model.generate(image, "Tell me.", max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=s)
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    greedy = model.generate(image, "Tell me.", max_new_tokens=16)
    assert runs[2] != runs[0] or runs[0] != greedy  # sampling is not secretly greedy


def test_stop_string_and_max_new_tokens(tiny):
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    image = _image(4)
    full_ids, px = _prompt(model, "Go on.", image_seed=4)
    req = model.engine.add(full_ids, [px], SamplingParams(max_new_tokens=20))
    model.engine.run()
    assert len(req.output_ids) == 20 and req.finish_reason == "length"
    text = model.tokenizer.decode(req.output_ids)
    stop = text.strip()[3:6]
    assert len(stop) == 3
    cut = model.generate(image, "Go on.", max_new_tokens=20, stop=stop)
    assert stop not in cut
    assert text.strip().startswith(cut)
    assert len(cut) < len(text.strip())


def test_prompt_past_the_context_is_refused(tiny):
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    context = model.config.text.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        model.generate(_image(0), "word " * context)


def test_generation_never_runs_past_the_context(tiny):
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    context = model.config.text.max_position_embeddings
    ids, px = _prompt(model, "Count.")
    req = model.engine.add(ids, [px], SamplingParams(max_new_tokens=10 * context))
    model.engine.run()
    assert req.num_tokens <= context
    if req.finish_reason == "length":
        assert req.num_tokens == context


@pytest.mark.parametrize("device, dtype, match", [("mps", None, "unsupported device"),
                                                  ("cpu", "float64", "unsupported dtype"),
                                                  ("cpu", torch.int8, "unsupported dtype")])
def test_bad_device_or_dtype(tiny, device, dtype, match):
    with pytest.raises(ValueError, match=match):
        phi_fast.load(tiny.paths["llava_phi"], device, dtype, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        phi_fast.load(tiny.paths["llava_phi"], "cuda", progress=False)


def test_one_line_generate_uses_the_environment(tiny, monkeypatch):
    monkeypatch.setenv("PHI_FAST_MODEL", str(tiny.paths["llava_phi"]))
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    assert phi_fast.generate(_image(5), "Hi?", max_new_tokens=8) == model.generate(_image(5), "Hi?", max_new_tokens=8)
    monkeypatch.delenv("PHI_FAST_MODEL")
    with pytest.raises(ValueError, match="PHI_FAST_MODEL"):
        phi_fast.generate(_image(5), "Hi?")


def test_generation_stops_at_eos(tiny):
    model = phi_fast.load(tiny.paths["llava_phi"], progress=False)
    ids, px = _prompt(model, "Stop now.")
    free = model.engine.add(ids, [px], SamplingParams(max_new_tokens=6))
    model.engine.run()
    assert free.finish_reason == "length" and len(free.output_ids) == 6
    third = free.output_ids[2]
    model.engine.tokenizer = _EosAs(model.tokenizer, third)  # the third greedy token plays EOS
    req = model.engine.add(ids, [px], SamplingParams(max_new_tokens=6))
    model.engine.run()
    assert req.finish_reason == "eos"
    assert req.output_ids == free.output_ids[: free.output_ids.index(third)]


class _EosAs:
    """The test tokenizer with another id standing in as EOS."""

    def __init__(self, tokenizer, eos: int):
        self._tok, self.eos_token_id = tokenizer, eos

    def stream_decoder(self):
        return self._tok.stream_decoder()
