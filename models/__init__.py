"""The shared model floor: open_clip loading and identities, image decoding, tokenizing."""
