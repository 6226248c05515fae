"""imagetool: build release images and manage the lab cluster."""
