"""Progressive rollouts: a challenger's share of traffic grows step by step, judged against control in the same window."""
