"""Fill the holes of an image file with a trained model: white pixels of the mask are the holes.

python jobs/inpaint_image.py --model models:/inpaint-fused-unet@champion --image in.png --mask holes.png --out out.png

Any image size works (the network runs on the image replicate-padded to a multiple of its size multiple,
then cropped back); pixels outside the holes are written unchanged. `--mode scaled` fills each hole at the
network's training scale, as the server does by default (`inpaint/fill.py`, docs/serving.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from inpaint import tracking
from inpaint.data import read_image
from inpaint.errors import UserError, cli_errors
from inpaint.evaluate import load_model
from inpaint.fill import MODES, inpaint_image
from inpaint.runtime import configure_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        required=True,
        metavar="URI",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint folder (with state.pt)",
    )
    parser.add_argument("--image", required=True, type=Path, help="the image to fill (PNG, JPEG, ...)")
    parser.add_argument("--mask", required=True, type=Path, help="same size as the image; white (>127) = hole")
    parser.add_argument("--out", required=True, type=Path, help="where to write the filled image (PNG)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="full",
        help="full: the network once over the whole picture (default); scaled: around each hole, at its training scale",
    )
    parser.add_argument(
        "--flip-average", action="store_true", help="average the fill with the mirrored image's (twice the compute)"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite)")
    return parser.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_process()
    image = read_image(args.image, "RGB")
    hole = read_image(args.mask, "L") > 127
    if hole.shape != image.shape[:2]:
        (height, width), (mask_height, mask_width) = image.shape[:2], hole.shape
        raise UserError(
            f"the mask {args.mask} is {mask_width}x{mask_height} but the image {args.image} is {width}x{height}; "
            "draw the mask at the image's size"
        )
    model = load_model(args.model, tracking.resolve_tracking_uri(args.tracking_uri))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    filled = inpaint_image(model, image, hole, mode=args.mode, flip_average=args.flip_average)
    Image.fromarray(filled).save(args.out, format="PNG")
    print(f"{args.out}: {int(hole.sum())} hole pixels of {image.shape[1]}x{image.shape[0]} filled")


if __name__ == "__main__":
    main()
