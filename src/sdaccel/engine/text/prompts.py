"""Prompt text -> the UNet's conditioning, read the way AUTOMATIC1111 reads it.

Syntax (A1111's attention syntax, `parse_prompt_attention`):

  (word)        weight x 1.1; nested brackets multiply: ((word)) is x 1.21
  (word:1.3)    weight x 1.3 (the number replaces the 1.1 of its own bracket)
  [word]        weight / 1.1
  \\( \\) \\[ \\]   the bracket itself, as text
  BREAK         ends the current chunk: what follows starts a new one
  unclosed brackets weigh to the end of the prompt; an unmatched closing bracket is text

Encoding (A1111's `FrozenCLIPEmbedderWithCustomWords`): the tokens are cut into chunks of
`window - 2` (75 for CLIP's 77-token window; a chunk that fills up breaks after its last comma
when that comma is within the last 20 tokens), each chunk is encoded on its own with BOS/EOS and
padding, each token's hidden state is multiplied by its weight, the mean of the chunk's hidden
states is restored to its unweighted value, and the chunks are concatenated along the sequence
axis. Prompts of one batch (and the negative prompt) are padded to the same number of chunks
with the empty prompt's chunk, as A1111 pads them.

A prompt without weights that fits one window gives exactly diffusers' embeddings (the same
token ids, one encoder call per batch as diffusers makes it, no arithmetic on the result).

The weighting is written here rather than taken from `compel`: compel reads its own syntax
(`word++`, `(word)1.3`), scales a token against the empty prompt's embedding instead of
multiplying it, down-weights by blending with the prompt without the word, restores no mean, and
splits long prompts at other places, so it cannot give A1111's embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sdaccel.events import EventHandler, Warning, ignore

ROUND = 1.1  # (word)
SQUARE = 1 / 1.1  # [word]
BREAK = ("BREAK", -1.0)  # a parsed BREAK, as A1111 marks it
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack

_SYNTAX = re.compile(
    r"""
      \\[()\[\]\\]                        # an escaped bracket or backslash: the character
    | \\                                  # a lone backslash: dropped
    | \(                                  # opens x1.1 (or the weight before its bracket)
    | \[                                  # opens /1.1
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\) # ':1.3)' closes a '(' with that weight
    | \)
    | \]
    | [^\\()\[\]:]+                       # plain text
    | :                                   # a colon that is no weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, neighbours of equal weight merged; a BREAK is
    ("BREAK", -1.0). Gives the results of A1111's function of the same name, e.g.
    'an (important) word' -> [('an ', 1.0), ('important', 1.1), (' word', 1.0)]."""
    runs: list[list] = []  # [text, weight]; BREAK markers keep their -1
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run[1] != BREAK[1]:
                run[1] *= factor

    for match in _SYNTAX.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(piece)):
                if k:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1] and run[1] != BREAK[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def plain_text(prompt: str) -> str:
    """The words of a prompt without its weighting syntax (for messages about them)."""
    return "".join(" " if run == BREAK else run[0] for run in parse_prompt_attention(prompt))


@dataclass
class Chunk:
    """One window of token ids (BOS, up to `window - 2` tokens, EOS, padding) and a weight
    per position."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


class PromptEncoder:
    """Encodes prompts with a tokenizer and text encoder: A1111's syntax and chunks when
    `weighting`, else the text as diffusers reads it (cut at the window, with a Warning)."""

    def __init__(self, tokenizer, text_encoder, device: torch.device, dtype: torch.dtype,
                 weighting: bool = True, expansions: dict[int, list[int]] | None = None,
                 on_event: EventHandler = ignore, hidden_layer: int | None = None) -> None:
        """`hidden_layer`: None, the encoder's last hidden states (SD 1.5); -2, the
        penultimate layer's, before the final norm (SDXL's two encoders)."""
        self.hidden_layer = hidden_layer
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype  # of the result: the UNet's
        self.weighting = weighting
        # A multi-vector textual-inversion token -> the ids of all its vectors, in order.
        self.expansions = expansions or {}
        self.on_event = on_event
        self.window = tokenizer.model_max_length
        self.chunk_length = self.window - 2
        vocab = tokenizer.get_vocab()
        self.comma = vocab.get(",</w>")
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    # ------------------------------------------------------------------ tokens

    def chunks(self, prompt: str) -> list[Chunk]:
        """The prompt's chunks, each `window` ids long (A1111's tokenize_line)."""
        runs = parse_prompt_attention(prompt)
        texts = [t for t, _ in runs]
        tokenized = self.tokenizer(texts, add_special_tokens=False, truncation=False,
                                   verbose=False).input_ids
        chunks: list[Chunk] = []
        current = Chunk()
        last_comma = -1

        def close() -> None:
            nonlocal current, last_comma
            fill = self.chunk_length - len(current.ids)
            chunks.append(Chunk([self.bos, *current.ids, self.eos, *[self.pad] * fill],
                                [1.0, *current.weights, 1.0, *[1.0] * fill]))
            current, last_comma = Chunk(), -1

        for (text, weight), ids in zip(runs, tokenized, strict=True):
            if (text, weight) == BREAK:
                close()
                continue
            for token in ids:
                unit = self.expansions.get(token, [token])  # an embedding's vectors stay together
                if token == self.comma:
                    last_comma = len(current.ids)
                elif (len(current.ids) == self.chunk_length and last_comma != -1
                      and len(current.ids) - last_comma <= COMMA_BACKTRACK):
                    # Full: what follows the last comma moves on to the next chunk.
                    cut = last_comma + 1
                    moved = Chunk(current.ids[cut:], current.weights[cut:])
                    current = Chunk(current.ids[:cut], current.weights[:cut])
                    close()
                    current = moved
                if len(current.ids) + len(unit) > self.chunk_length:
                    close()
                current.ids += unit
                current.weights += [weight] * len(unit)
        if current.ids or not chunks:
            close()
        return chunks

    def chunk_count(self, prompt: str, negative_prompt: str | None = None) -> int:
        """Chunks this prompt (with this negative prompt) is encoded in: prompts of one batch
        are padded to the largest count, which changes the conditioning of the shorter ones
        (as in A1111), so a caller merging prompts into one batch groups them by this count."""
        texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        return max(len(self.chunks(t)) for t in texts) if self.weighting else 1

    def empty_chunk(self) -> Chunk:
        """The empty prompt's chunk: what shorter prompts are padded with."""
        return Chunk([self.bos, self.eos, *[self.pad] * self.chunk_length],
                     [1.0] * self.window)

    # ------------------------------------------------------------------ embeddings

    def encode(self, prompts: Sequence[str], negative_prompt: str | None = None
               ) -> torch.Tensor:
        """(len(prompts), L, D) embeddings in `dtype`; with a negative prompt
        [negative x len(prompts); prompts], both L long (L = window x chunks)."""
        return self.encode_pooled(prompts, negative_prompt)[0]

    @torch.no_grad()
    def encode_pooled(self, prompts: Sequence[str], negative_prompt: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`'s embeddings, and each row's pooled output (the encoder's first output at
        the end token: SDXL's second encoder's projection), of its text's first chunk as A1111
        takes it."""
        rows = list(prompts)
        groups = [rows] if negative_prompt is None else [[negative_prompt] * len(rows), rows]
        if not self.weighting:
            parts = [self._encode_plain(texts) for texts in groups]
        else:
            chunked = [[self.chunks(text) for text in texts] for texts in groups]
            count = max(len(c) for texts in chunked for c in texts)
            empty = self.empty_chunk()
            parts = [self._encode_chunks([c + [empty] * (count - len(c)) for c in texts])
                     for texts in chunked]
        return torch.cat([h for h, _ in parts]), torch.cat([p for _, p in parts])

    def _run(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's hidden states (the layer this encoder reads) and first output."""
        out = self.text_encoder(ids, output_hidden_states=self.hidden_layer is not None)
        hidden = out[0] if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        return hidden, out[0]

    def _encode_chunks(self, texts: list[list[Chunk]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder call over every chunk of every text; chunks joined along the sequence."""
        flat = [chunk for chunks in texts for chunk in chunks]
        ids = torch.tensor([c.ids for c in flat], device=self.device)
        hidden, first = self._run(ids)
        z = hidden.to(self.dtype, copy=any(c.weighted for c in flat))
        for row, chunk in enumerate(flat):
            if chunk.weighted:
                weights = torch.tensor(chunk.weights, device=hidden.device)
                z[row] = apply_weights(hidden[row].float(), weights).to(self.dtype)
        per_text = len(flat) // len(texts)
        return z.reshape(len(texts), -1, z.shape[-1]), first[::per_text].to(self.dtype)

    def _encode_plain(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' encoding: the text as is, cut at the window (said in a Warning)."""
        full = self.tokenizer(texts, truncation=False, verbose=False).input_ids
        for text, ids in zip(texts, full, strict=True):
            if len(ids) > self.window:
                cut = len(ids) - self.window
                self.on_event(Warning(
                    f"prompt {_short(text)!r} is {len(ids) - 2} tokens; the text encoder reads "
                    f"{self.chunk_length}: the last {cut} token(s) are cut (prompt.weighting: "
                    "true encodes long prompts in chained chunks instead)"))
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.window,
                                truncation=True, return_tensors="pt")
        hidden, first = self._run(tokens.input_ids.to(self.device))
        return hidden.to(self.dtype), first.to(self.dtype)


class DualPromptEncoder:
    """SDXL's text conditioning: both encoders' penultimate hidden states side by side (CLIP
    ViT-L's, then OpenCLIP bigG's), the second's pooled projection, an empty negative prompt as
    zeros where the model says so (as StableDiffusionXLPipeline). Chunks, weights and BREAK are
    read the same way by both (their tokenizers share the vocabulary)."""

    def __init__(self, first: PromptEncoder, second: PromptEncoder,
                 zero_empty_negative: bool) -> None:
        self.first, self.second = first, second
        self.zero_empty_negative = zero_empty_negative
        self.tokenizer = first.tokenizer

    @property
    def weighting(self) -> bool:
        return self.first.weighting

    def chunks(self, prompt: str) -> list[Chunk]:
        return self.first.chunks(prompt)

    def chunk_count(self, prompt: str, negative_prompt: str | None = None) -> int:
        return self.first.chunk_count(prompt, negative_prompt)

    def encode(self, prompts: Sequence[str], negative_prompt: str | None = None
               ) -> torch.Tensor:
        return self.encode_pooled(prompts, negative_prompt)[0]

    def encode_pooled(self, prompts: Sequence[str], negative_prompt: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = negative_prompt == "" and self.zero_empty_negative
        negative = None if zeros else negative_prompt
        hidden, _ = self.first.encode_pooled(prompts, negative)
        hidden_2, pooled = self.second.encode_pooled(prompts, negative)
        hidden = torch.cat([hidden, hidden_2], dim=-1)
        if zeros:  # [zeros; prompts], as the pipeline's negative embeddings for ""
            hidden = torch.cat([torch.zeros_like(hidden), hidden])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        return hidden, pooled


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor,
                  restore_mean: bool = True) -> torch.Tensor:
    """One chunk's hidden states (L, D) times its per-token weights (L), rescaled so that
    the mean of the whole chunk is what it was before weighting (A1111's "Original" emphasis)."""
    weighted = hidden * weights[:, None]
    if restore_mean and weighted.mean() != 0:
        weighted = weighted * (hidden.mean() / weighted.mean())
    return weighted


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
