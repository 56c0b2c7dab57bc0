/** The version of arca, printed by `arca --version`. The one place it is written. */
export const VERSION = "0.1.0";
