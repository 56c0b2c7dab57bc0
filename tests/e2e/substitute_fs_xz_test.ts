// The end-to-end substitution case with the filesystem backend and xz chunks.
import { substitutionSuite } from "./substitution_suite.ts";

substitutionSuite("filesystem", "xz");
