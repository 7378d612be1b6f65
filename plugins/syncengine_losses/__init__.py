"""Perceptual sync losses: LPIPS (alex/vgg/squeeze) and Gram-matrix style loss on VGG features."""
