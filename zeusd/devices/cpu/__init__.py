"""CPU package energy backends behind one interface: RAPL sysfs and a simulator."""
