"""The toy reasoning task (chained arithmetic), its trained tiny models and the demo."""
