"""Draw the example images with plain Pillow (not the training generator), so they test the model on new drawings.

    python examples/make_examples.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent


def canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (256, 256), (236, 234, 228))
    return image, ImageDraw.Draw(image)


def main() -> None:
    image, draw = canvas()
    draw.ellipse([24, 88, 104, 168], fill=(215, 35, 35))
    draw.rectangle([150, 84, 234, 168], fill=(35, 75, 215))
    image.save(HERE / "red-circle-blue-square.png")

    image, draw = canvas()
    draw.polygon([(128, 50), (210, 200), (46, 200)], fill=(40, 155, 60))
    image.save(HERE / "green-triangle.png")

    image, draw = canvas()
    draw.rectangle([40, 150, 100, 210], fill=(130, 50, 170))
    draw.ellipse([150, 30, 230, 110], fill=(240, 200, 30))
    image.save(HERE / "purple-square-yellow-circle.png")


if __name__ == "__main__":
    main()
