"""The embedded default's prompts: instructions over everyday topics. Adapter training uses the templates on the
training topics (template by template, so that any prefix of the list covers every topic); tree planning
calibrates on its own topics; the demo's fixed evaluation set uses topics that neither ever saw."""

TRAIN_TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning", "volcanoes",
    "the human heart", "climate change", "the stock market", "honey bees", "the Roman Empire", "electric cars",
    "vaccines", "the moon landing", "rainbows", "earthquakes", "the internet", "coffee", "the Great Wall of China",
    "recycling", "solar panels", "DNA", "the immune system", "jazz music", "the Olympic Games", "tides", "sleep",
    "chess", "the printing press", "penguins", "glaciers", "bread baking", "airplanes", "democracy",
    "the periodic table", "coral reefs", "inflation", "meditation", "the Amazon rainforest", "bicycles", "gravity",
    "the Renaissance", "vitamins", "hurricanes", "dinosaurs", "3D printing", "the Silk Road", "recycling plastic",
    "volunteering", "public libraries", "renewable energy", "the solar system", "friendship", "time management",
    "learning a new language", "trains", "the ocean", "mushrooms", "the brain", "cloud computing", "traffic lights",
    "paper making", "rivers", "tea ceremonies", "wolves", "deserts", "electricity", "magnets", "the camera",
    "running a marathon", "gardening", "composting", "bridges", "satellites", "spiders", "the violin", "pizza",
    "origami",
)
CALIBRATION_TOPICS = ("kites", "volcano islands", "bakeries", "thunderstorms")
EVAL_TOPICS = (
    "the human skeleton", "autumn leaves", "snowflakes", "lighthouses", "submarines", "robots", "elephants",
    "castles", "museums", "typewriters", "clocks", "windmills",
)
TEMPLATES = (
    "Explain {topic} to a ten-year-old.",
    "Write a short paragraph about {topic}.",
    "What are three interesting facts about {topic}?",
    "Give me a few tips related to {topic}.",
    "Why is {topic} important?",
    "Describe the history of {topic} briefly.",
    "Write a short poem about {topic}.",
    "What are common misconceptions about {topic}?",
    "How does {topic} work?",
    "List the pros and cons of {topic}.",
    "Tell a short story that involves {topic}.",
    "What would happen if {topic} disappeared?",
    "Teach me the basics of {topic} in five steps.",
    "What questions do people often ask about {topic}?",
    "Compare {topic} with something similar.",
    "Write a short speech about {topic}.",
)


def train_prompts() -> list[str]:
    """Every template on every training topic, template by template (the first 624 are the first 8 templates)."""
    return [template.format(topic=topic) for template in TEMPLATES for topic in TRAIN_TOPICS]


def calibration_prompts() -> list[str]:
    """For tree planning: topics that neither training nor evaluation uses."""
    return [TEMPLATES[i % len(TEMPLATES)].format(topic=topic) for i, topic in enumerate(CALIBRATION_TOPICS)]


def eval_prompts() -> list[str]:
    """One prompt per held-out topic, the templates taken in turn."""
    return [TEMPLATES[i % len(TEMPLATES)].format(topic=topic) for i, topic in enumerate(EVAL_TOPICS)]


def frozen_eval_set() -> list[dict]:
    """The frozen evaluation set (`eval_set.json`): [{"kind", "messages": [{"role", "content"}, ...]}, ...], written
    apart from the training prompts in kinds and phrasings the templates do not use (code, arithmetic, rewriting,
    translation, summaries of given text, troubleshooting, letters, questions, instructions, multi-turn chat, long
    inputs). Nothing may train on it (tests/test_eval_set.py)."""
    import json
    import os

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_set.json")) as f:
        return json.load(f)["prompts"]
