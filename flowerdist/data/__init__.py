"""Flower data: synthetic generation, download, folders, splits, transforms and sharded loading."""

#: The five classes of TensorFlow's flower_photos set, in ImageFolder (sorted) order.
FLOWER_CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
