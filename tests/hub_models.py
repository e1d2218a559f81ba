"""Tiny KerasHub tasks built offline: backbones from config, tokenizers
from an in-memory vocabulary, with raw inputs (strings, uint8 images) for
each. `from_preset` would download; these are the same classes, small."""

from __future__ import annotations

import keras
import numpy as np

WORDS = "good bad great awful fun boring".split()
_BPE = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "Ġa": 5, "Ġb": 6,
        "Ġc": 7}
_MERGES = ["Ġ a", "Ġ b", "Ġ c"]


def text_classifier(seed=0, preprocessor=True):
    """BertTextClassifier, 2 classes, sequence length 8."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8, dropout=0.0)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, dropout=0.0,
        preprocessor=keras_hub.models.BertTextClassifierPreprocessor(
            tokenizer, sequence_length=8) if preprocessor else None)


def reviews(n=32, seed=0):
    """(strings, labels): a review is positive when most words are."""
    rng = np.random.default_rng(seed)
    texts = np.array([" ".join(rng.choice(WORDS, 4)) for _ in range(n)])
    labels = np.array([int(sum(w in ("good", "great", "fun")
                               for w in t.split()) > 2) for t in texts])
    return texts, labels


def image_classifier(seed=0):
    """ResNetImageClassifier whose preprocessor resizes to 16 x 16 and
    rescales by 1/255."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    converter = keras_hub.layers.ResNetImageConverter(image_size=(16, 16),
                                                      scale=1 / 255.0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64], stackwise_num_blocks=[1],
        stackwise_num_strides=[1], block_type="basic_block",
        use_pre_activation=False, image_shape=(16, 16, 3))
    return keras_hub.models.ResNetImageClassifier(
        backbone, num_classes=2,
        preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(
            converter))


def raw_images(n=16, seed=0):
    """(uint8 images of 24 x 24, labels)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 24, 24, 3)).astype("uint8"),
            rng.integers(0, 2, size=n))


def causal_lm(seed=0, dtype=None):
    """GPT2CausalLM over the letters a, b, c; sequence length 8."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=_BPE,
                                               merges=_MERGES)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(_BPE), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8, dropout=0.0,
        dtype=dtype)
    return keras_hub.models.GPT2CausalLM(
        backbone, preprocessor=keras_hub.models.GPT2CausalLMPreprocessor(
            tokenizer, sequence_length=8))


def sentences(n=8, seed=0):
    """Strings of 1 to 5 letters: padded to different lengths."""
    rng = np.random.default_rng(seed)
    return np.array([" ".join(rng.choice(list("abc"), rng.integers(1, 6)))
                     for _ in range(n)])


def seq2seq_lm(seed=0):
    """BartSeq2SeqLM over the letters a, b, c; sequences of 8."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4,
             **{k: v + 4 for k, v in _BPE.items() if v}}
    tokenizer = keras_hub.models.BartTokenizer(vocabulary=vocab,
                                               merges=_MERGES)
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=len(vocab), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8, dropout=0.0)
    return keras_hub.models.BartSeq2SeqLM(
        backbone, preprocessor=keras_hub.models.BartSeq2SeqLMPreprocessor(
            tokenizer, encoder_sequence_length=8, decoder_sequence_length=8))


def pairs(n=8, seed=0):
    """{"encoder_text", "decoder_text"}: a sequence and its reverse."""
    source = sentences(n, seed)
    return {"encoder_text": source,
            "decoder_text": np.array([s[::-1] for s in source])}


def basnet(seed=0):
    """BASNetImageSegmenter (its own `compute_loss`: the refined output and
    7 deep-supervision outputs, the backbone run again) on 32 x 32 images,
    with a small ResNet encoder."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False)
    backbone = keras_hub.models.BASNetBackbone(
        image_encoder=encoder, num_classes=1, image_shape=(32, 32, 3))
    return keras_hub.models.BASNetImageSegmenter(backbone)


def masks(n=8, seed=0):
    """(images in [0, 1], binary masks) of 32 x 32."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(n, 32, 32, 3)).astype("float32"),
            (rng.uniform(size=(n, 32, 32, 1)) > 0.5).astype("float32"))
