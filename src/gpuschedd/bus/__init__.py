"""Everything that speaks D-Bus on the daemon side: our service objects, and our clients of systemd and
polkit. No other module of the daemon imports a D-Bus library."""
