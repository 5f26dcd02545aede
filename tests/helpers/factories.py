"""Factories for tests: tiny tokenizers and tiny random checkpoints, made on the spot (never downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

# Special tokens per FIM style, in the order (prefix, suffix, middle); see serve_app/tokenizer.py.
FIM_STYLES = {
    "starcoder": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    "qwen": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
    "deepseek": ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
    "codellama": ["<PRE>", "<SUF>", "<MID>"],
    "none": [],
}

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "héllo wörld — ünïcode ✓ 你好 🙂\n",
]


def build_tokenizer(out_dir: str | Path, fim_style: str = "starcoder", vocab_size: int = 320,
                    chat_template: str | None = None, fim_order: str | None = None) -> Path:
    """A byte-level BPE trained on a few lines of code; writes tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", *FIM_STYLES[fim_style], "<file_sep>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"eos_token": "<|endoftext|>", "bos_token": None}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    if fim_order is not None:
        cfg["fim_order"] = fim_order
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


# Llama/CodeLlama-style specials: the real CodeLlama vocabulary spells its FIM tokens with a leading "▁".
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]
CODELLAMA_FIM_TOKENS = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]


def build_sentencepiece_tokenizer(out_dir: str | Path, vocab_size: int = 400) -> Path:
    """A Llama-style tokenizer (Metaspace dummy prefix, byte fallback, bos post-processor, CodeLlama FIM tokens).

    Same pre-tokenizer and decoder as transformers' CodeLlamaTokenizer, so FIM and streaming see the real
    dummy-prefix behaviour. Returns the directory; tokenizer_config.json names bos "<s>" and eos "</s>".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    trainee.pre_tokenizer = metaspace
    trainee.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SENTENCEPIECE_SPECIALS, show_progress=False))
    trained = json.loads(trainee.to_str())["model"]
    # Byte tokens right after the specials, as in Llama, so characters outside the vocabulary fall back to bytes.
    vocab = {tok: i for i, tok in enumerate(SENTENCEPIECE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for tok in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens(SENTENCEPIECE_SPECIALS + CODELLAMA_FIM_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out
