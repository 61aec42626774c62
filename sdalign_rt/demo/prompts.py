"""The embedded default's prompts: instructions over everyday topics. Adapter training uses every template on
the training topics; the demo's fixed evaluation set uses topics that training never saw."""

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
)


def train_prompts() -> list[str]:
    return [template.format(topic=topic) for topic in TRAIN_TOPICS for template in TEMPLATES]


def eval_prompts() -> list[str]:
    """One prompt per held-out topic, the templates taken in turn."""
    return [TEMPLATES[i % len(TEMPLATES)].format(topic=topic) for i, topic in enumerate(EVAL_TOPICS)]
