//! image-assembler
