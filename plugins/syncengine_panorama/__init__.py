"""Panorama family: sliding windows over 1D strips and 2D canvases, with horizontal loop closure."""
