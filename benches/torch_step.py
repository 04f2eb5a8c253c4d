#!/usr/bin/env python3
"""PyTorch eager baseline of alignfuse's training step, for `scripts/bench-vs-torch.sh` and
`scripts/gpu-check.sh`: the ALBEF pre-training step on the model an alignfuse config describes, at the
same batch size and caption length, timed the way `alignfuse bench train` times its own.

One step: EMA of the momentum encoders; online ViT + BERT (text layers) and their projections; momentum
features against the queues for ITC with momentum distillation; in-batch hard negatives drawn with
torch.multinomial (batched, no per-row .item()) and the fusion layers + ITM head over the 3B pairs; BERT
masking (15%: 80/10/10) and MLM distilled from the momentum model's logits; backward; AdamW (weight decay
on >= 2-D weights, as alignfuse); enqueue. The encoders are the fixture generator's plain-torch references
(tests/fixtures/gen_fixtures.py: `ref_vit`, `ref_bert`, `ref_mlm_head`, checked there against timm's ViT
and HF's BERT layers composed as ALBEF's xbert) over ALBEF-named parameters, so only torch is needed. No
dropout (the references have none): with dropout the baseline would only be slower.

    python benches/torch_step.py --config configs/tiny.toml --steps 10 --threads 1 --tokens 20 \
        [--device cpu|cuda] [--precision fp32|tf32|bf16] [--json out.json]

bf16 is torch.autocast (fp32 master weights and optimizer state).
"""

import argparse
import json
import os
import resource
import sys
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gen_fixtures as gf  # noqa: E402

torch.use_deterministic_algorithms(False)  # the generator asks for it; a benchmark must not pay for it


def encoder_shapes(m):
    """ALBEF's names and shapes of one set of encoders (visual_encoder, text_encoder, projections)."""
    v, t = m["vision"], m["text"]
    w, h, p, inter = v["vision_width"], t["hidden_size"], v["patch_size"], t["intermediate_size"]
    mlp, grid = int(w * v.get("mlp_ratio", 4.0)), v["image_res"] // p
    s = {"visual_encoder.patch_embed.proj.weight": (w, 3, p, p), "visual_encoder.patch_embed.proj.bias": (w,),
         "visual_encoder.cls_token": (1, 1, w), "visual_encoder.pos_embed": (1, 1 + grid * grid, w),
         "visual_encoder.norm.weight": (w,), "visual_encoder.norm.bias": (w,)}
    for i in range(v["vision_depth"]):
        b = f"visual_encoder.blocks.{i}."
        for name, shape in [("norm1", (w,)), ("norm2", (w,))]:
            s[b + name + ".weight"], s[b + name + ".bias"] = shape, shape
        for name, (o, n) in [("attn.qkv", (3 * w, w)), ("attn.proj", (w, w)), ("mlp.fc1", (mlp, w)),
                             ("mlp.fc2", (w, mlp))]:
            s[b + name + ".weight"], s[b + name + ".bias"] = (o, n), (o,)
    e = "text_encoder.bert.embeddings."
    s.update({e + "word_embeddings.weight": (t["vocab_size"], h),
              e + "position_embeddings.weight": (t["max_position_embeddings"], h),
              e + "token_type_embeddings.weight": (t.get("type_vocab_size", 2), h),
              e + "LayerNorm.weight": (h,), e + "LayerNorm.bias": (h,)})
    for i in range(t["num_hidden_layers"]):
        L = f"text_encoder.bert.encoder.layer.{i}."
        linears = [("attention.self.query", h, h), ("attention.self.key", h, h), ("attention.self.value", h, h),
                   ("attention.output.dense", h, h), ("intermediate.dense", inter, h), ("output.dense", h, inter)]
        norms = ["attention.output.LayerNorm", "output.LayerNorm"]
        if i >= t["fusion_layer"]:
            linears += [("crossattention.self.query", h, h), ("crossattention.self.key", h, w),
                        ("crossattention.self.value", h, w), ("crossattention.output.dense", h, h)]
            norms += ["crossattention.output.LayerNorm"]
        for name, o, n in linears:
            s[L + name + ".weight"], s[L + name + ".bias"] = (o, n), (o,)
        for name in norms:
            s[L + name + ".weight"], s[L + name + ".bias"] = (h,), (h,)
    c = "text_encoder.cls.predictions."
    s.update({c + "transform.dense.weight": (h, h), c + "transform.dense.bias": (h,),
              c + "transform.LayerNorm.weight": (h,), c + "transform.LayerNorm.bias": (h,),
              c + "bias": (t["vocab_size"],),
              "vision_proj.weight": (m["embed_dim"], w), "vision_proj.bias": (m["embed_dim"],),
              "text_proj.weight": (m["embed_dim"], h), "text_proj.bias": (m["embed_dim"],)})
    return s


class Albef:
    """The online parameters (trained), their momentum twins and the queues, over gen_fixtures' references."""

    def __init__(self, cfg, dev):
        m = cfg["model"]
        self.v, self.t = m["vision"], m["text"]
        gen = torch.Generator().manual_seed(0)

        def init(name, shape):
            norm = name.endswith("LayerNorm.weight") or (name.endswith(".weight") and ".norm" in name)
            return torch.ones(shape) if norm else 0.02 * torch.randn(shape, generator=gen)

        shapes = encoder_shapes(m)
        heads = {"itm_head.weight": (2, self.t["hidden_size"]), "itm_head.bias": (2,)}
        self.online = {n: init(n, s).to(dev).requires_grad_() for n, s in {**shapes, **heads}.items()}
        self.online["temp"] = torch.tensor(m.get("temp", 0.07), device=dev).requires_grad_()
        self.twins = list(shapes)
        self.momentum_params = {n: self.online[n].detach().clone() for n in self.twins}
        q = m.get("queue_size", 65536)
        self.image_queue = F.normalize(torch.randn(m["embed_dim"], q, device=dev), dim=0)
        self.text_queue = F.normalize(torch.randn(m["embed_dim"], q, device=dev), dim=0)
        self.queue_ptr = 0
        self.momentum, self.alpha, self.vocab = m.get("momentum", 0.995), m.get("alpha", 0.4), self.t["vocab_size"]

    def parameters(self):
        return list(self.online.values())

    @torch.no_grad()
    def ema(self):
        mom = [self.momentum_params[n] for n in self.twins]
        torch._foreach_mul_(mom, self.momentum)
        torch._foreach_add_(mom, [self.online[n] for n in self.twins], alpha=1 - self.momentum)

    def image(self, sd, x):
        return gf.ref_vit(sd, "visual_encoder.", x, self.v["patch_size"], self.v["vision_heads"],
                          self.v["vision_depth"], self.v.get("vision_ln_eps", 1e-6))

    def bert(self, sd, mode, mask, ids=None, h=None, img=None):
        t = self.t
        return gf.ref_bert(sd, "text_encoder.bert.", mode, mask, ids=ids, h=h, img=img,
                           heads=t["num_attention_heads"], fusion_layer=t["fusion_layer"],
                           layers=t["num_hidden_layers"], eps=t.get("layer_norm_eps", 1e-12))

    def mlm_logits(self, sd, ids, mask, img):
        h = self.bert(sd, "multimodal", mask, ids=ids, img=img)
        return gf.ref_mlm_head(sd, "text_encoder.cls.predictions.", sd["text_encoder.bert.embeddings.word_embeddings.weight"], h,
                               self.t.get("layer_norm_eps", 1e-12))

    def mask_tokens(self, ids, p=0.15):
        labels = ids.clone()
        full = lambda v: torch.full(ids.shape, v, device=ids.device)  # noqa: E731
        masked = torch.bernoulli(full(p)).bool() & (ids != gf.PAD_ID) & (ids != gf.CLS_ID)
        labels[~masked] = -100
        ids = ids.clone()
        to_mask = torch.bernoulli(full(0.8)).bool() & masked
        ids[to_mask] = gf.MASK_ID
        rand = torch.bernoulli(full(0.5)).bool() & masked & ~to_mask
        ids[rand] = torch.randint(self.vocab, ids.shape, device=ids.device)[rand]
        return ids, labels

    def loss(self, image, ids, mask):
        on, mo, alpha, b = self.online, self.momentum_params, self.alpha, ids.shape[0]
        with torch.no_grad():
            on["temp"].clamp_(0.001, 0.5)
        temp = on["temp"]
        image_embeds = self.image(on, image)
        image_feat = F.normalize(F.linear(image_embeds[:, 0, :], on["vision_proj.weight"], on["vision_proj.bias"]), dim=-1)
        text_embeds = self.bert(on, "text", mask, ids=ids)
        text_feat = F.normalize(F.linear(text_embeds[:, 0, :], on["text_proj.weight"], on["text_proj.bias"]), dim=-1)
        with torch.no_grad():
            image_embeds_m = self.image(mo, image)
            image_feat_m = F.normalize(F.linear(image_embeds_m[:, 0, :], mo["vision_proj.weight"], mo["vision_proj.bias"]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)
            text_m = self.bert(mo, "text", mask, ids=ids)
            text_feat_m = F.normalize(F.linear(text_m[:, 0, :], mo["text_proj.weight"], mo["text_proj.bias"]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)
            targets = torch.zeros(b, image_feat_all.shape[1], device=image.device)
            targets.fill_diagonal_(1)
            i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_all / temp, dim=1) + (1 - alpha) * targets
            t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_all / temp, dim=1) + (1 - alpha) * targets
        sim_i2t = image_feat @ text_feat_all / temp
        sim_t2i = text_feat @ image_feat_all / temp
        loss_itc = (-(F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
                    - (F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()) / 2
        self.enqueue(image_feat_m, text_feat_m)
        with torch.no_grad():
            w_i2t = F.softmax(sim_i2t[:, :b].float(), dim=1) + 1e-5
            w_t2i = F.softmax(sim_t2i[:, :b].float(), dim=1) + 1e-5
            w_i2t.fill_diagonal_(0)
            w_t2i.fill_diagonal_(0)
            neg_image = torch.multinomial(w_t2i, 1).squeeze(1)
            neg_text = torch.multinomial(w_i2t, 1).squeeze(1)
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], 0)
        mask_all = torch.cat([mask, mask, mask[neg_text]], 0)
        image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], 0)
        fused = self.bert(on, "fusion", mask_all, h=text_all, img=image_all)
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(image.device)
        loss_itm = F.cross_entropy(F.linear(fused[:, 0, :], on["itm_head.weight"], on["itm_head.bias"]), labels)
        mlm_ids, mlm_labels = self.mask_tokens(ids)
        with torch.no_grad():
            logits_m = self.mlm_logits(mo, mlm_ids, mask, image_embeds_m)
        logits = self.mlm_logits(on, mlm_ids, mask, image_embeds)
        ce = F.cross_entropy(logits.view(-1, self.vocab), mlm_labels.view(-1), ignore_index=-100)
        distill = -(F.log_softmax(logits, -1) * F.softmax(logits_m, -1)).sum(-1)[mlm_labels != -100].mean()
        loss_mlm = (1 - alpha) * ce + alpha * distill
        return loss_itc + loss_itm + loss_mlm

    @torch.no_grad()
    def enqueue(self, image_feat, text_feat):
        q, b = self.image_queue.shape[1], image_feat.shape[0]
        idx = (torch.arange(b, device=image_feat.device) + self.queue_ptr) % q
        self.image_queue[:, idx] = image_feat.t().to(self.image_queue.dtype)
        self.text_queue[:, idx] = text_feat.t().to(self.text_queue.dtype)
        self.queue_ptr = (self.queue_ptr + b) % q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=20, help="caption length of the batch, [CLS] and [SEP] included")
    ap.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    torch.manual_seed(0)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    dev = torch.device(args.device)
    model = Albef(cfg, dev)
    tr = cfg.get("train", {})
    b = args.batch_size or tr.get("batch_size", 64)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.get("weight_decay", 0.02)},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tr.get("lr", 1e-4))
    res, L = cfg["model"]["vision"]["image_res"], args.tokens
    image = torch.randn(b, 3, res, res, device=dev)
    ids = torch.randint(5, cfg["model"]["text"]["vocab_size"], (b, L), device=dev)
    ids[:, 0], ids[:, -1] = gf.CLS_ID, gf.SEP_ID
    mask = torch.ones(b, L, device=dev)

    def step():
        model.ema()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model.loss(image, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    used = 0.0
    for _ in range(args.steps):
        step()
        if dev.type == "cuda":  # measured as alignfuse measures its own: total minus free, after the step
            sync()
            free, total = torch.cuda.mem_get_info()
            used = max(used, (total - free) / 2**20)
    sync()
    secs = time.perf_counter() - start
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"pairs_per_s": args.steps * b / secs, "ms_per_step": 1000 * secs / args.steps, "peak_mib": peak,
           "device": str(dev), "precision": args.precision, "threads": args.threads, "batch_size": b,
           "tokens": L, "torch": torch.__version__, "device_used_mib": used if dev.type == "cuda" else None}
    print(f"torch {torch.__version__} eager, {args.steps} steps of {b} pairs ({L} tokens) on {dev} "
          f"({args.precision}, {args.threads} threads): {out['pairs_per_s']:.1f} pairs/s, "
          f"{out['ms_per_step']:.1f} ms/step, peak {'GPU memory' if dev.type == 'cuda' else 'RSS'} {peak:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
