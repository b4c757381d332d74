"""The coordinator actor: the SPIN loop and what it runs between engines and trainer."""
