"""The embedded visual QA world: 1-3 coloured shapes on a 32 px canvas, and questions with one-word answers.

A scene is a list of objects (colour, shape, cell) on a 2x2 grid of cells (top/bottom, left/right).
Questions ask for the colour of a shape, the shape of a colour, how many objects there are, or what is
in a cell; each answer is one word, so an answer is right or a hallucination, measured exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (225, 190, 30)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("one", "two", "three")
BACKGROUND = (235, 235, 235)
IMAGE_SIZE = 32
WORDS = (*COLOURS, *SHAPES, *COUNTS, "top", "bottom", "left", "right", "nothing", "what", "colour", "is", "the",
         "shape", "how", "many", "objects", "are", "there", "in", "?", ".", "a", "it", "image", "answer", "question",
         "describe", "and", "of", "with", "image1", "image2", "image3", "image4", "image5", "cell", "picture", "which",
         "user", "assistant", ":", "first", "second", "third", "fourth", "fifth", "large", "small", "inset")
"""Every word of the world's prompts and answers: the tiny tokenizer's vocabulary."""


def render(objects: list[tuple[str, str, int]], size: int = IMAGE_SIZE) -> Image.Image:
    """Draw each (colour, shape, cell index) object centred in its quarter of the canvas."""
    scale = 4
    canvas = Image.new("RGB", (size * scale, size * scale), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    half, r = size * scale / 2, size * scale * 0.17
    for colour, shape, cell in objects:
        x, y = half * (cell % 2) + half / 2, half * (cell // 2) + half / 2
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=COLOURS[colour])
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


PRIOR = {"square": "red", "circle": "blue", "triangle": "green"}
"""The usual colour of each shape in a biased world (`qa_rows(prior=p)`): a language prior a model can learn."""


def random_objects(rng: np.random.Generator, max_objects: int = 3, prior: float = 0.0) -> list[tuple[str, str, int]]:
    """1 to `max_objects` objects with distinct shapes and colours in distinct cells; with probability `prior` a scene's
    objects take their shapes' usual colours (PRIOR)."""
    n = int(rng.integers(1, max_objects + 1))
    colours = rng.choice(list(COLOURS), n, replace=False).tolist()
    shapes = rng.choice(SHAPES, n, replace=False)
    cells = rng.choice(len(CELLS), n, replace=False)
    if prior > 0 and rng.random() < prior:
        colours = [PRIOR[str(s)] for s in shapes]
    return [(str(c), str(s), int(k)) for c, s, k in zip(colours, shapes, cells)]


def question(objects: list[tuple[str, str, int]], rng: np.random.Generator) -> tuple[str, str]:
    """A (question, one-word answer) pair about the scene: a colour, a shape, the count, or a cell's shape."""
    kind = int(rng.integers(4))
    colour, shape, cell = objects[int(rng.integers(len(objects)))]
    if kind == 0:
        return f"what colour is the {shape} ?", colour
    if kind == 1:
        return f"what shape is the {colour} one ?", shape
    if kind == 2:
        return "how many objects are there ?", COUNTS[len(objects) - 1]
    cell = int(rng.integers(len(CELLS)))
    found = [s for _, s, k in objects if k == cell]
    return f"what is in the {CELLS[cell]} ?", found[0] if found else "nothing"


def qa_rows(n: int, seed: int, max_objects: int = 3, prior: float = 0.0) -> list[dict]:
    """n single-image QA rows {'image', 'objects', 'question', 'answer'} from the world (see `random_objects`)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        objects = random_objects(rng, max_objects, prior)
        q, a = question(objects, rng)
        rows.append({"image": render(objects), "objects": objects, "question": q, "answer": a})
    return rows


def prompt_text(question_text: str, images: int = 1) -> str:
    """The plain-text prompt of the tiny model: its image placeholders, then the question and 'answer :'."""
    return "<image> " * images + f"question : {question_text} answer :"


def wrong_answer(answer: str, rng: np.random.Generator) -> str:
    """A different word of the answer's kind (colour, shape or count; 'nothing' counts as a shape): a hallucination."""
    for kind in (tuple(COLOURS), (*SHAPES, "nothing"), COUNTS):
        if answer in kind:
            return str(rng.choice([w for w in kind if w != answer]))
    raise ValueError(f"{answer!r} is not an answer of the world")


def preference_rows(n: int, seed: int, conversational: bool = False) -> list[dict]:
    """n TRL rows from the world: chosen = the true answer, rejected = a wrong one of the same kind."""
    rng = np.random.default_rng(seed + 1)
    rows: list[dict[str, Any]] = []
    for qa in qa_rows(n, seed):
        chosen, rejected = qa["answer"], wrong_answer(qa["answer"], rng)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": qa["question"]}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "images": [qa["image"]]})
        else:
            rows.append({"prompt": prompt_text(qa["question"]), "chosen": f" {chosen} </s>",
                         "rejected": f" {rejected} </s>", "images": [qa["image"]]})
    return rows
