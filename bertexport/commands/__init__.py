"""The CLI's commands, one module per concept; ``bertexport.cli`` holds the group, the exit-code
contract and the options they share, and imports these to register them."""
