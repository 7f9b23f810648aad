"""``python -m control_plane.usage``: the meter (what ``tessera meter`` runs)."""

from control_plane.__main__ import meter_main

if __name__ == "__main__":
    raise SystemExit(meter_main())
