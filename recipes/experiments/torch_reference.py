"""A PyTorch GPT of the same architecture, the speed anchor for the trainer on CPU.

The shape follows nanoGPT's CPU reference (GPT-2 blocks: pre-LayerNorm, causal
self-attention, 4x GELU MLP, tied embedding and output layer, vocabulary padded
to 50,304). It is only timed, eager and under ``torch.compile``, never trained
to a result; the trainer's own model is ``model/gpt.py``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_attn, self.ln_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.attn_out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp_in, self.mlp_out = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(d, dim=2)
        heads = [z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, d_model: int, context_length: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d_model), nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        for module in self.modules():  # the trainer's init: N(0, 0.02) weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied output layer
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def reference_step(n_layer: int, n_head: int, d_model: int, context_length: int, vocab: int, batch: int,
                   compile: bool, seed: int = 0):
    """One AdamW training step of the reference on fixed random tokens, warmed up (and compiled) once."""
    torch.manual_seed(seed)
    model = ReferenceGPT(n_layer, n_head, d_model, context_length, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loss_fn = torch.compile(model) if compile else model
    tokens = torch.randint(0, vocab, (batch, context_length + 1))

    def step():
        loss = loss_fn(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    return step
