"""Spherical (360°) family: equirectangular canvas geometry, perspective and cube-map views."""
