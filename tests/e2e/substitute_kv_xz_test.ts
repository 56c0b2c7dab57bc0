// The end-to-end substitution case with the kv backend and xz chunks.
import { substitutionSuite } from "./substitution_suite.ts";

substitutionSuite("kv", "xz");
