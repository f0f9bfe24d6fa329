"""LLaVA-Phi as plain tensors: CLIP ViT tower -> mlp2x_gelu projector -> Phi-2 decoder (spec/llava-phi.md).

Weights come from `weights.load_weights` under canonical names, already in the layout the ops want
(qkv rows ordered (3, heads, head_dim), the patch conv as a [C, 3*p*p] matrix). Every step is an op of
`phi_fast.ops`; `ops.linear` is torch's GEMM except for decode-sized products on the CPU, where our GEMV reads
the weights near memory bandwidth (MKL's does not: bench/NOTES.md). The model knows no requests: it sees token
embeddings, positions and the paged-cache metadata of one step (`StepBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .config import ModelConfig, TextConfig, VisionConfig
from .kv_cache import PagePool
from .prompt import IMAGE_TOKEN_INDEX
from .reference import rotary_tables

Weights = dict[str, torch.Tensor]


@dataclass
class StepBatch:
    """Paged-cache metadata of one forward step over S sequences and T new tokens (design.md section 2)."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, -1 = skip
    block_table: torch.Tensor  # [S, max_pages] int32
    seq_lens: torch.Tensor  # [S] int32, cached tokens including the new ones
    cu_seqlens_q: torch.Tensor  # [S + 1] int32, sequence s owns new tokens cu[s]:cu[s+1]
    no_prefix: bool  # every sequence's new tokens are all its tokens: attention needs no cache read

    @property
    def last_token_index(self) -> torch.Tensor:  # [S] int64
        return self.cu_seqlens_q[1:].long() - 1


class VisionTower:
    """CLIP ViT up to hidden_states[select_layer]; the later layers and post_layernorm never run."""

    def __init__(self, cfg: VisionConfig, w: Weights):
        self.cfg = cfg
        self.w = w
        self.layers = [_prefixed(w, f"vision.layers.{i}.") for i in range(cfg.layers_used)]
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711))
        device = w["vision.patch.weight"].device
        self.mean, self.std = mean.to(device), std.to(device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, S, S] normalized float, or uint8 (normalized inside) -> [B, N or N + 1, Cv]."""
        cfg, w = self.cfg, self.w
        if pixels.dtype != torch.uint8:
            pixels = pixels.to(w["vision.patch.weight"].dtype)
        x = ops.patch_embed(pixels, w["vision.patch.weight"], w["vision.class_embedding"],
                            w["vision.position_embedding"], w["vision.pre_ln.weight"], w["vision.pre_ln.bias"],
                            cfg.layer_norm_eps, cfg.patch_size, self.mean, self.std)  # [B, N + 1, Cv]
        b, n1, c = x.shape
        x = x.view(b * n1, c)
        cu_seqlens = torch.arange(0, b + 1, dtype=torch.int32, device=x.device) * n1
        if self.layers:
            h = ops.layernorm(x, self.layers[0]["ln1.weight"], self.layers[0]["ln1.bias"], cfg.layer_norm_eps)
        for i, lw in enumerate(self.layers):
            qkv = ops.linear(h, lw["qkv.weight"], lw["qkv.bias"]).view(-1, 3, cfg.num_heads, cfg.head_dim)
            o = ops.prefill_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cfg.head_dim ** -0.5, False)
            attn = ops.linear(o.view(-1, c), lw["out.weight"], lw["out.bias"])
            x, h = ops.add_layernorm(x, attn, None, lw["ln2.weight"], lw["ln2.bias"], cfg.layer_norm_eps)
            mlp = ops.linear(self._act(ops.linear(h, lw["fc1.weight"]), lw["fc1.bias"]), lw["fc2.weight"],
                             lw["fc2.bias"])
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1]
                x, h = ops.add_layernorm(x, mlp, None, nxt["ln1.weight"], nxt["ln1.bias"], cfg.layer_norm_eps)
            else:
                x = x + mlp
        x = x.view(b, n1, c)
        return x[:, 1:] if cfg.select_feature == "patch" else x

    def _act(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.cfg.hidden_act == "quick_gelu":
            return ops.bias_quick_gelu(x, bias)
        return ops.bias_gelu(x, bias, approximate="none")


class Projector:
    """mlp2x_gelu: Linear -> GELU (erf) -> Linear."""

    def __init__(self, w: Weights):
        self.w = w

    def __call__(self, features: torch.Tensor, out: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """features: [B, N, Cv] -> [B, N, C]; or written into out (B views of [N, C]) with no extra copy."""
        w = self.w
        b, n, cv = features.shape
        h = ops.linear(features.reshape(b * n, cv), w["projector.fc1.weight"])
        h = ops.bias_gelu(h, w["projector.fc1.bias"], approximate="none")  # [B * N, Cp]
        if out is None:
            return ops.linear(h, w["projector.fc2.weight"], w["projector.fc2.bias"]).view(b, n, -1)
        for i, dst in enumerate(out):
            if isinstance(w["projector.fc2.weight"], torch.Tensor):
                torch.addmm(w["projector.fc2.bias"], h[i * n:(i + 1) * n], w["projector.fc2.weight"].t(), out=dst)
            else:  # packed (phi_fast.quant)
                dst.copy_(ops.linear(h[i * n:(i + 1) * n], w["projector.fc2.weight"], w["projector.fc2.bias"]))
        return None


class PhiDecoder:
    """Phi-2: parallel blocks with one LayerNorm, partial NeoX rotary, gelu_new MLP, lm_head with bias."""

    def __init__(self, cfg: TextConfig, w: Weights):
        self.cfg = cfg
        self.w = w
        self.layers = [_prefixed(w, f"text.layers.{i}.") for i in range(cfg.num_layers)]
        device = w["text.embed"].device
        self.cos, self.sin = rotary_tables(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, device)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [T] int64 -> [T, C]."""
        return F.embedding(token_ids, self.w["text.embed"])

    def __call__(self, x: torch.Tensor, batch: StepBatch, cache: PagePool) -> torch.Tensor:
        """x: [T, C] input embeddings -> [T, C] final-LayerNormed hidden states (the new tokens' k, v are cached)."""
        cfg, w = self.cfg, self.w
        t, c = x.shape
        eps, scale = cfg.layer_norm_eps, cfg.head_dim ** -0.5
        lns = [(lw["ln.weight"], lw["ln.bias"]) for lw in self.layers]
        lns.append((w["text.final_ln.weight"], w["text.final_ln.bias"]))
        h = ops.layernorm(x, *lns[0], eps)
        for i, lw in enumerate(self.layers):
            qkv = ops.linear(h, lw["qkv.weight"], lw["qkv.bias"]).view(t, 3, cfg.num_heads, cfg.head_dim)
            kc, vc = cache.key_caches[i], cache.value_caches[i]
            ops.rotary_cache(qkv, batch.positions, self.cos, self.sin, kc, vc, batch.slot_mapping)
            if batch.no_prefix:
                o = ops.prefill_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], batch.cu_seqlens_q, scale, True)
            else:
                o = ops.paged_attention(qkv[:, 0], kc, vc, batch.block_table, batch.seq_lens, batch.cu_seqlens_q, scale)
            a = ops.linear(o.view(t, c), lw["dense.weight"], lw["dense.bias"])
            g = ops.bias_gelu(ops.linear(h, lw["fc1.weight"]), lw["fc1.bias"])
            f = ops.linear(g, lw["fc2.weight"], lw["fc2.bias"])
            x, h = ops.add_layernorm(x, a, f, *lns[i + 1], eps)  # x = (a + f) + x, h = next LayerNorm(x)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [S, C] final hidden states -> [S, V] fp32 logits."""
        return ops.linear(h, self.w["text.lm_head.weight"], self.w["text.lm_head.bias"]).float()


class LlavaPhi:
    """The whole model: encode images, splice them into the prompt embeddings, run Phi-2 steps."""

    def __init__(self, cfg: ModelConfig, w: Weights):
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, w)
        self.projector = Projector(w)
        self.decoder = PhiDecoder(cfg.text, w)
        self.device = w["text.embed"].device
        self.dtype = w["text.embed"].dtype

    @property
    def image_tokens(self) -> int:
        """Rows one image contributes to the prompt."""
        v = self.cfg.vision
        return v.num_patches + (0 if v.select_feature == "patch" else 1)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, S, S] -> [B, image_tokens, C] projected image embeddings."""
        return self.projector(self.vision(pixels.to(self.device)))

    @torch.inference_mode()
    def embed_prompt(self, token_ids: list[int], pixels: torch.Tensor | None) -> torch.Tensor:
        """token_ids with IMAGE_TOKEN_INDEX markers; pixels: [B, 3, S, S], one image per marker -> [T, C].

        The projector writes each image's rows straight into the prompt's embedding buffer.
        """
        ids = torch.tensor(token_ids, dtype=torch.int64)
        is_image = ids == IMAGE_TOKEN_INDEX
        n_markers = int(is_image.sum())
        n_images = 0 if pixels is None else pixels.shape[0]
        if n_markers != n_images:
            raise ValueError(f"prompt has {n_markers} image markers but {n_images} images were given")
        n_img = self.image_tokens
        text_rows = self.decoder.embed(ids[~is_image].to(self.device))  # [T_text, C]
        out = torch.empty(len(token_ids) + n_markers * (n_img - 1), text_rows.shape[1],
                          dtype=self.dtype, device=self.device)
        # Each marker becomes n_img rows: row of token j = j + (n_img - 1) * (markers before j).
        row = torch.arange(len(token_ids)) + (n_img - 1) * (torch.cumsum(is_image.long(), 0) - is_image.long())
        out[row[~is_image].to(self.device)] = text_rows
        if n_markers:
            self.projector(self.vision(pixels.to(self.device)), [out[r:r + n_img] for r in row[is_image].tolist()])
        return out

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, batch: StepBatch, cache: PagePool,
                all_logits: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """embeds: [T, C] -> fp32 logits [S, V] of each sequence's last new token ([T, V] with all_logits;
        [R, V] of the new tokens `rows` ([R] int64) when given: lm_head runs on those rows only)."""
        h = self.decoder(embeds, batch, cache)
        if all_logits:
            return self.decoder.logits(h)
        h = h[batch.last_token_index if rows is None else rows]
        if h.shape[0] == 0:  # no row sampled this step (prompt chunks that are not a prompt's last)
            return torch.empty(0, self.cfg.text.vocab_size, dtype=torch.float32, device=h.device)
        return self.decoder.logits(h)


def _prefixed(w: Weights, prefix: str) -> Weights:
    return {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
