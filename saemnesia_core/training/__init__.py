# SPDX-License-Identifier: GPL-3.0-or-later
"""Training pipeline (DESIGN §4-5): prompt specs -> labelled activation shards -> TopK SAE -> concept statistics."""
